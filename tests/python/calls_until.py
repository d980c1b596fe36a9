"""A legacy Python etcd client (etcd3 0.12) with auth, calling in a loop: authenticates once when
it is made, then puts and gets a key every 20 ms until a file appears. Never raises.

usage: calls_until.py HOST:PORT USER PASSWORD KEY STOP_FILE CA CERT KEY_FILE
prints "OK <calls>" when every call succeeded, else "ERROR <call number> <code> <details>"
for the first failure. With TLS, because grpcio sends call credentials over TLS only.
"""
import os
import sys
import time

import etcd3
import grpc


def main():
    address, user, password, key, stop_file, ca, cert, cert_key = sys.argv[1:9]
    host, port = address.rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port), user=user, password=password, timeout=10,
                          ca_cert=ca, cert_cert=cert, cert_key=cert_key)
    calls = 0
    while not os.path.exists(stop_file):
        try:
            client.put(key, str(calls))
            value, _ = client.get(key)
            assert value.decode() == str(calls), value
        except grpc.RpcError as error:
            print("ERROR %d %s %s" % (calls, error.code().name, error.details()), flush=True)
            return
        except Exception as error:  # etcd3 wraps some gRPC errors in its own exceptions
            print("ERROR %d %s %s" % (calls, type(error).__name__, error), flush=True)
            return
        calls += 1
        time.sleep(0.02)
    print("OK %d" % calls, flush=True)


main()
