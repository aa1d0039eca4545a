"""layrot.agent"""
