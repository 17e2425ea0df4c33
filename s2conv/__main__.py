from s2conv.cli import main

main()
