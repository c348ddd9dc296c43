"""The engine-neutral layer: what the in-kernel and the remote engines share.

Requests, handles and results, the snapshot shape, subscriptions, the engine
protocol, the waiting queue, feeding and progress, and the base both engines
build on. It imports nothing above it: no engine, no session, no view.
"""
