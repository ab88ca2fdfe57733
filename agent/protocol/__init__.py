"""What the agent and the UI share, and nothing else: the wire format, session files,
connection files, run directories, socket security and command validation. Imports
neither torch nor textual.
"""
