"""Code that runs in the training thread: hooks, statistics on the device, parameter
statistics, knobs applied at the step boundary, checkpoints.
"""
