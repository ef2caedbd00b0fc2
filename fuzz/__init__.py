"""Fuzz targets for every keyseal parser that reads outside input, shared by the bounded CI properties
(tests/test_fuzz_*.py, hypothesis) and the long runner (fuzz/run.py, atheris or hypothesis).

Contract under test: whatever the bytes, a parser returns or raises a `KeysealError` subclass; never another
exception, never a hang.
"""
