"""layrot.proto"""
