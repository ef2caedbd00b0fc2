"""keyseal's internals: everything here may change in any release, without notice.

The public interface is the `keyseal` package itself (the facade in `keyseal.api`, re-exported by
`keyseal/__init__.py`), the exception types in `keyseal.errors`, the `Signer` contract in `keyseal.signer`,
the command line, and the file formats in docs/. Import nothing from `keyseal._internal` in code you ship.
"""
