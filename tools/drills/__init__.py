"""Drills that kill real runs and check what they resume to."""
