"""layrot.server"""
