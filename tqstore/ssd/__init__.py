"""The SSD tier: durable, verified fp16 boundary snapshots of prompt blocks (LMDB index + payload
files). Entry point: BlockStore (store.py); design notes in docs/fragments/ssd.md."""

from tqstore.ssd.check import CheckReport
from tqstore.ssd.config import StoreConfig
from tqstore.ssd.payload import BlockPayload
from tqstore.ssd.stats import NamespaceStats, StoreStats
from tqstore.ssd.store import BlockStore

__all__ = ["BlockPayload", "BlockStore", "CheckReport", "NamespaceStats", "StoreConfig", "StoreStats"]
