"""Task heads; importing this package registers every head kind."""

from ecgfm.heads.base import Head, create_head, list_heads, register_head
from ecgfm.heads.multilabel import MultiLabelHead
from ecgfm.heads.regression import RegressionHead

__all__ = ["Head", "MultiLabelHead", "RegressionHead", "create_head", "list_heads", "register_head"]
