"""s2conv.checkpoint"""
