"""What the disk store keeps beside the blocks, per model: its block count, stored bytes and key index.

`SpecBooks(env, fingerprint)` reads and writes them inside the caller's LMDB transaction, so they change
in the same commit as the blocks (they hold across processes and crashes):
- `lmdb_key(key)`: the LMDB key of a block of this model (fingerprint + block key);
- `counters(txn)` / `set_counters(txn, count, stored)`: this model's block count and stored payload bytes;
- `stored_len(txn, lmdb_key)`: a value's length from the index (None when absent), without reading it;
- `drop(txn, lmdb_key)`: deletes a value and its index entry, counting it out;
- `keys(txn)`: this model's block keys, by a prefix scan of the index.
"""

from __future__ import annotations

import struct

import lmdb

from kvtier.tiers.disk.format import HEADER_BYTES, lmdb_key
from kvtier.tiers.keys import BlockKey

_U64 = struct.Struct("<Q")


class SpecBooks:
    """The per-model books of one disk store (see the module docstring)."""

    def __init__(self, env: object, fingerprint: bytes) -> None:
        self._env = env
        self._fp = fingerprint
        self._count_key = b"count/" + fingerprint
        self._stored_key = b"stored/" + fingerprint

    def lmdb_key(self, key: BlockKey) -> bytes:
        """The LMDB key of a block of this model (checks that the key has 16 bytes)."""
        return lmdb_key(self._fp, key)

    def counters(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """(blocks stored, stored payload bytes) of this model."""
        values = (txn.get(name, db=self._env.meta_db) for name in (self._count_key, self._stored_key))
        count, stored = (_U64.unpack(v)[0] if v is not None else 0 for v in values)
        return count, stored

    def set_counters(self, txn: lmdb.Transaction, count: int, stored: int) -> None:
        txn.put(self._count_key, _U64.pack(max(count, 0)), db=self._env.meta_db)
        txn.put(self._stored_key, _U64.pack(max(stored, 0)), db=self._env.meta_db)

    def stored_len(self, txn: lmdb.Transaction, lk: bytes) -> int | None:
        """Length of `lk`'s value from the index (None when absent); the value itself is not read."""
        entry = txn.get(lk, db=self._env.index_db)
        return None if entry is None else _U64.unpack(entry)[0]

    def index(self, txn: lmdb.Transaction, lk: bytes, value_len: int) -> None:
        """Records a value's length in the index (same transaction as the value)."""
        txn.put(lk, _U64.pack(value_len), db=self._env.index_db)

    def drop(self, txn: lmdb.Transaction, lk: bytes) -> bool:
        """Deletes `lk`'s value and, if it was indexed, its index entry and its share of the counters;
        whether it was indexed (counted)."""
        old_len = self.stored_len(txn, lk)
        txn.delete(lk, db=self._env.blocks_db)
        if old_len is None:
            return False
        txn.delete(lk, db=self._env.index_db)
        count, stored = self.counters(txn)
        self.set_counters(txn, count - 1, stored - max(old_len - HEADER_BYTES, 0))
        return True

    def keys(self, txn: lmdb.Transaction) -> list[BlockKey]:
        """This model's block keys, by a prefix scan of the index (no block page is read)."""
        fp, out = self._fp, []
        cursor = txn.cursor(db=self._env.index_db)
        if cursor.set_range(fp):
            for lk in cursor.iternext(keys=True, values=False):
                lk = bytes(lk)
                if not lk.startswith(fp):
                    break
                out.append(BlockKey(lk[len(fp):]))
        return out
