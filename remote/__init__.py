"""What runs on the GPU box: the agent, the trainer and the wire protocol.

This package imports only the standard library and itself; torch and friends are imported
inside the trainer's functions. The client imports only :mod:`loraburst.remote.protocol`.
"""
