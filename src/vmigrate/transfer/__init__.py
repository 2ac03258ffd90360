"""The disk transfer engine: chunk, zero-skip, hash, compress, encrypt, frame,
journal, resume and verify (see ``engine.py`` for the pipeline in one place)."""
