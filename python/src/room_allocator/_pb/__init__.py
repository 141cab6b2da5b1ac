"""Stubs generated from ``proto/room_allocator/v1/room_allocator.proto``.

Do not edit the ``room_allocator_pb2*`` modules: regenerate them with
``python/scripts/gen_stubs.py``; a test fails when they are out of date.
"""
