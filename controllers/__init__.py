"""layrot.controllers"""
