"""Wrapped key records as bytes on disk or in a store, and the ledger of versions seen: below both the stores that
keep records and the wrapping that makes them, so neither imports the other.

- `record`: the record format (keyseal.wrapped-key v1/v2, docs/record-format.md), parsed strictly;
- `ledger`: the highest version seen of each record, so a store rolled back to an older record is refused.
"""
