"""The only package that imports ``torch.distributed``: the transport over a process group
(``transport.py``) and the DDP communication hook (``hook.py``)."""
