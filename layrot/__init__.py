"""layrot: watch and steer layer rotation in running training jobs."""
__version__ = "0.1.0"
