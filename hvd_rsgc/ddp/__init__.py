"""The only package that imports ``torch.distributed``: the transport over a process group
(``transport.py``)."""
