"""layrot.hooks"""
