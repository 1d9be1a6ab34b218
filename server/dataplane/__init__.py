"""The protocol-neutral data plane: the one request scope every frontend enters, and the operations (classify,
windows, batch, tasks and models, registration, the model repository) that the frontends' codecs call."""
