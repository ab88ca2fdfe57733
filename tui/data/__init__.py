"""The UI's data side: sockets, stores, session loading, SSH. Never imports textual.
"""
