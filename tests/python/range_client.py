"""A legacy Python etcd client (etcd3 0.12 on grpcio, default 4 MiB receive limit) reading a
prefix, for the size-budget tests. Prints one result line; never raises.

usage: range_client.py HOST:PORT MODE PREFIX
  get_prefix  etcd3's own get_prefix (no limit): "OK <keys>" or "ERROR <code> <details>"
  paged LIMIT Range with `limit`, following `more`: "PAGES <pages> KEYS <keys> UNIQUE <unique> MAXMSG <bytes>"
  once        one Range without limit: "ONCE <keys> MORE <more> COUNT <count> MSG <bytes>"
  txn         one Txn whose success branch ranges over the prefix: "TXN <keys>" or "ERROR ..."
  watch N     watch the prefix, print "READY" once created, then after N events (or an error)
              "WATCH MESSAGES <m> EVENTS <n> UNIQUE <u> ORDERED <bool> MAXMSG <bytes>"
"""
import sys
import threading

import etcd3
import grpc
from etcd3.etcdrpc import rpc_pb2


def prefix_end(prefix):
    return prefix[:-1] + bytes([prefix[-1] + 1])


def watch(client, prefix, expected):
    # The library's own stub (its Watcher keeps it private), so responses are seen one by one.
    stop = threading.Event()

    def requests():
        create = rpc_pb2.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix))
        yield rpc_pb2.WatchRequest(create_request=create)
        # Keep the request stream open: closing it would end the watch.
        stop.wait()

    messages, biggest, keys = 0, 0, []
    try:
        for response in client.watcher._watch_stub.Watch(requests()):
            if response.created:
                print("READY", flush=True)
                continue
            messages += 1
            biggest = max(biggest, response.ByteSize())
            keys.extend(event.kv.key for event in response.events)
            if len(keys) >= expected:
                break
    finally:
        stop.set()
    print(f"WATCH MESSAGES {messages} EVENTS {len(keys)} UNIQUE {len(set(keys))} ORDERED {keys == sorted(keys)} MAXMSG {biggest}")


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    mode = sys.argv[2]
    prefix = sys.argv[3].encode()
    client = etcd3.client(host=host, port=int(port))
    try:
        if mode == "get_prefix":
            keys = sum(1 for _ in client.get_prefix(prefix))
            print(f"OK {keys}")
        elif mode == "paged":
            limit = int(sys.argv[4])
            key, end = prefix, prefix_end(prefix)
            pages, seen, biggest = 0, [], 0
            while True:
                response = client.kvstub.Range(rpc_pb2.RangeRequest(key=key, range_end=end, limit=limit))
                pages += 1
                biggest = max(biggest, response.ByteSize())
                seen.extend(kv.key for kv in response.kvs)
                if not response.more:
                    break
                key = response.kvs[-1].key + b"\0"
            print(f"PAGES {pages} KEYS {len(seen)} UNIQUE {len(set(seen))} ORDERED {seen == sorted(seen)} MAXMSG {biggest}")
        elif mode == "once":
            response = client.kvstub.Range(rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix)))
            print(f"ONCE {len(response.kvs)} MORE {response.more} COUNT {response.count} MSG {response.ByteSize()}")
        elif mode == "get":
            response = client.kvstub.Range(rpc_pb2.RangeRequest(key=prefix))
            print(f"GET {len(response.kvs)} COUNT {response.count} MSG {response.ByteSize()}")
        elif mode == "txn":
            get = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix)))
            response = client.kvstub.Txn(rpc_pb2.TxnRequest(success=[get]))
            print(f"TXN {len(response.responses[0].response_range.kvs)}")
        elif mode == "watch":
            watch(client, prefix, int(sys.argv[4]))
        else:
            print(f"USAGE unknown mode {mode}")
    except grpc.RpcError as error:
        print(f"ERROR {error.code().name} {error.details()}")


main()
