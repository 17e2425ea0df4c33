"""s2conv.converter"""
