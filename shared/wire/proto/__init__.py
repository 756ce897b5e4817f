"""Generated protocol code (``make protos``); never edit the files below this folder by hand.

``protos/fedmedclip/v1/*.proto`` is compiled with the proto path mapped as ``shared/wire/proto=protos``,
so the generated modules import each other as ``shared.wire.proto.fedmedclip.v1...`` and need no
``sys.path`` tricks. The protobuf package stays ``fedmedclip.v1``.
"""
