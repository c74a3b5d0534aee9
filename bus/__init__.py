"""Control plane of DéjàVu serving: wire messages, codec, sockets, the controller and the async client."""
