"""The SSD tier: durable, verified fp16 boundary snapshots of prompt blocks (LMDB index + payload
files). Entry point: BlockStore (store.py); design notes in docs/fragments/ssd.md. The block it
stores is tqstore.blocks.BlockPayload, which the client shares without importing this package."""

from tqstore.ssd.check import CheckReport
from tqstore.config import StoreConfig
from tqstore.ssd.stats import NamespaceStats, StoreStats
from tqstore.ssd.store import BlockStore

__all__ = ["BlockStore", "CheckReport", "NamespaceStats", "StoreConfig", "StoreStats"]
