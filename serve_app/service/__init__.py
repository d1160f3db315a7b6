"""The images service: one normalized request, one planner, one executor.

The request it takes and the answers and errors it gives are the protocol's
(``serve_app/protocol/``). ``images.py`` (:class:`ImagesService`: decode uploads, plan,
execute, encode) -> ``planning.py`` (every limit checked, the stages chosen, before any model
work) -> ``execution.py`` (handle calls, latents passed replica to replica) -> ``encoding.py``
(PNG/JPEG/WebP on CPU). No HTTP here, and no Ray in planning.
"""
