"""Code that runs in the agent thread: the socket loop (``loop``), the authentication gate
(``gate``), the history server (``history``), the wakeup it sleeps on (``wakeup``),
recording (``recorder``), report finalization (``finalize``), detectors, auto-pause and
the command queue (``controller``). Imports no torch.
"""
