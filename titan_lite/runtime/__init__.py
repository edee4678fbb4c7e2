"""What every entry point runs on: process groups and devices (``distributed``), the launcher
(``launch``), host memory kept mapped (``host_allocator``), tensor memory tracking (``memory``)
and the training log (``metrics``)."""
