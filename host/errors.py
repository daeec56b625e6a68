"""The errors sparsa raises: a model's, a device's and its transports' (below the driver:
transports import these and nothing of the driver)."""


class ModelError(ValueError):
    """A model, a saved file or an input that sparsa cannot run; the message names the node
    or argument and what was expected."""


class DeviceError(RuntimeError):
    """The device refused a job or did not finish it; the message quotes STATUS and ERROR."""


class TransferError(DeviceError):
    """The transport could not move a job's packets: e.g. the DMA reported a fault."""
