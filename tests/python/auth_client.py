"""A legacy Python etcd client (etcd3 0.12) with auth: authenticates once, idles, then works.
Prints one result line; never raises.

usage: auth_client.py HOST:PORT USER PASSWORD IDLE_SECONDS PREFIX [CA CERT KEY]
  authenticates (etcd3 does so once, when the client is made), sleeps IDLE_SECONDS, then puts
  PREFIX+"k", gets it back, creates a watch on PREFIX+"w" and waits for one event written
  after it: "OK <value> <event key>" or "ERROR <step> <code> <details>"
With CA, CERT and KEY the channel uses TLS: grpcio sends call credentials (etcd3's token) only
over secure channels.
"""
import sys
import threading
import time

import etcd3
import grpc


def main():
    address, user, password, idle, prefix = sys.argv[1:6]
    tls = {}
    if len(sys.argv) > 6:
        tls = dict(ca_cert=sys.argv[6], cert_cert=sys.argv[7], cert_key=sys.argv[8])
    host, port = address.rsplit(":", 1)
    step = "authenticate"
    try:
        client = etcd3.client(host=host, port=int(port), user=user, password=password, timeout=10, **tls)
        time.sleep(float(idle))
        step = "put"
        client.put(prefix + "k", "v1")
        step = "get"
        value, _ = client.get(prefix + "k")
        step = "watch"
        events, cancel = client.watch(prefix + "w")
        writer = threading.Timer(0.5, lambda: client.put(prefix + "w", "event"))
        writer.start()
        event = next(events)
        cancel()
        print("OK %s %s" % (value.decode(), event.key.decode()), flush=True)
    except grpc.RpcError as error:
        print("ERROR %s %s %s" % (step, error.code().name, error.details()), flush=True)
    except Exception as error:  # etcd3 wraps some gRPC errors in its own exceptions
        print("ERROR %s %s %s" % (step, type(error).__name__, error), flush=True)


main()
