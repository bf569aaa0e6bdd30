"""raygate's data plane: route table, the DataPlane interface and its engines.

Knows nothing of rollouts; the control plane steers it only through `DataPlane`.
"""
