"""The errors a device and its transports raise (below the driver: transports import these and
nothing of the driver)."""


class DeviceError(RuntimeError):
    """The device refused a job or did not finish it; the message quotes STATUS and ERROR."""


class TransferError(DeviceError):
    """The transport could not move a job's packets: e.g. the DMA reported a fault."""
