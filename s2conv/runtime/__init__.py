"""s2conv.runtime"""
