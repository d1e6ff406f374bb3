"""The sidecars the suite starts again and again: each module one setup (its config, policy and clients).

Test files import setups from here, never from one another, so that a test file is only ever a
list of specifications. Fixtures live in ``tests/conftest.py`` (or a directory's ``conftest.py``).
"""
