"""s2conv.verify"""
