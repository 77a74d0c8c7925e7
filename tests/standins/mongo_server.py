"""Stand-in MongoDB for the tests: mongoeco's wire server (no mongod is installable here).

Run with the Python of its own venv (mongoeco needs Python >= 3.13):
    python mongo_server.py PORT [USER PASSWORD]
Prints READY when it accepts connections; stops on SIGTERM.
"""

import asyncio
import signal
import sys

from mongoeco.engines.memory import MemoryEngine
from mongoeco.wire import AsyncMongoEcoProxyServer, WireAuthUser


async def main() -> None:
    port = int(sys.argv[1])
    users = ()
    if len(sys.argv) >= 4:
        users = (WireAuthUser(sys.argv[2], sys.argv[3], roles=({"role": "root", "db": "admin"},)),)
    engine = MemoryEngine(aggregation_materialization_limit=None)
    server = AsyncMongoEcoProxyServer(engine=engine, host="127.0.0.1", port=port,
                                      auth_users=users)
    await server.start()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


asyncio.run(main())
