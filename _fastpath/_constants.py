"""The constants both implementations share, in a module that imports nothing.

`_compiled` imports them from here rather than from `_pure`, so a node running the compiled fast
path never loads numpy (and with it OpenBLAS, whose thread pool would make the process
multi-threaded: every socket syscall then takes the kernel's slower shared-file-table path).
"""

#: Bytes kept free in front of every encoded frame, so picows can write the WebSocket header
#: in place (`WSTransport.send_reuse_external_bytearray` needs at least 14).
HEADER_ROOM = 14
#: The level reported for digital silence.
DBFS_FLOOR = -100.0
#: A session's batch of client frames (relayed reply audio and transcript deltas) is written
#: when it reaches this many bytes, not only at the end of the socket read that produced it: a
#: read can hold a megabyte of a fast upstream's deltas (picows doubles its read buffer while
#: reads fill it), and a client that stopped reading must get no more than this past its
#: transport's high-water mark before the pause reaches the session and the queue takes over.
CLIENT_BATCH_BYTES = 32 * 1024
