"""Projections of K devices from one device's profile: the timeline of each schedule, and `lctrun project`."""
