"""Code that runs in the agent thread: the socket loop, the authentication gate, recording,
report finalization, detectors, auto-pause and the command queue. Imports no torch.
"""
