"""Apache Kafka broker in KRaft mode, from pinned Maven Central jars."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import re
import shutil
import subprocess
import uuid
from collections.abc import Coroutine
from pathlib import Path
from string import Template
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.errors import ToolMissingError
from infra.processes import accepts_connections
from infra.services.base import Listener, LocalService, require_tool, run_build_step, split_host_port

logger = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
MIN_JAVA_MAJOR = 17
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "kafka"
SETTING = "CRC_KAFKA_BOOTSTRAP_SERVERS"
HEAP_OPTIONS = ("-Xms256m", "-Xmx512m")
PROBE_TIMEOUT_S = 5.0

_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


class KafkaService(LocalService):
    """Single-node Kafka broker and KRaft controller in one process.

    The client listener comes from ``CRC_KAFKA_BOOTSTRAP_SERVERS``; the
    controller listener uses the next port on the same host.
    """

    name = "kafka"
    process_marker = "kafka.Kafka"
    start_timeout_s = 90.0
    stop_timeout_s = 30.0

    @property
    def version(self) -> str:
        """Pinned Kafka release."""
        return KAFKA_VERSION

    @property
    def host_port(self) -> tuple[str, int]:
        """Host and port of the client listener."""
        return split_host_port(self.settings.kafka_bootstrap_servers, setting=SETTING)

    @property
    def address(self) -> str:
        """Bootstrap server address for clients."""
        host, port = self.host_port
        return f"{host}:{port}"

    @property
    def controller_port(self) -> int:
        """Port of the KRaft controller listener: the client port plus one."""
        return self.host_port[1] + 1

    @property
    def libs_dir(self) -> Path:
        """Folder of the broker's jars in the cache."""
        return self.layout.cache_dir(self.name, self.version) / "libs"

    def listeners(self) -> list[Listener]:
        """Return the client and controller listeners."""
        host, port = self.host_port
        return [
            Listener(host, port, SETTING, "client listener"),
            Listener(host, self.controller_port, SETTING, "KRaft controller listener (client port + 1)"),
        ]

    def provision(self) -> bool:
        """Check Java, then fetch the pinned jars with Maven unless they are cached."""
        self._check_java()
        if self.libs_dir.is_dir():
            return False

        require_tool("mvn", install_hint="install Maven 3, for example `apt-get install -y maven`")
        cache_dir = self.libs_dir.parent
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(TEMPLATE_DIR / "pom.xml", cache_dir / "pom.xml")

        partial = cache_dir / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        logger.info("service=kafka fetching jars version=%s into=%s", self.version, self.libs_dir)
        run_build_step(
            ["mvn", "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={partial}"],
            service=self.name,
            log_path=cache_dir / "provision.log",
            cwd=cache_dir,
            timeout_s=900,
        )
        partial.replace(self.libs_dir)
        return True

    def _check_java(self) -> None:
        java = require_tool(
            "java", install_hint="install Java 17, for example `apt-get install -y openjdk-17-jre-headless`"
        )
        output = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
        match = _JAVA_VERSION.search(output)
        if match is None:
            logger.warning("service=kafka could not read the Java version from %r", output[:200])
            return

        major = int(match.group(1))
        if major == 1 and match.group(2):
            major = int(match.group(2))
        if major < MIN_JAVA_MAJOR:
            raise ToolMissingError(
                f"Java {major} found at {java}, but the local stack runs Kafka on Java {MIN_JAVA_MAJOR} or newer; "
                "install it, for example `apt-get install -y openjdk-17-jre-headless`"
            )

    def prepare_run(self) -> None:
        """Write the broker config and format the KRaft storage on first start."""
        super().prepare_run()
        self.config_path.write_text(self.render_config())
        shutil.copy2(TEMPLATE_DIR / "log4j.properties", self.run_dir / "log4j.properties")

        if not (self.data_dir / "meta.properties").exists():
            self._format_storage()

    def render_config(self) -> str:
        """Return the broker's server.properties for these settings."""
        host, port = self.host_port
        template = Template((TEMPLATE_DIR / "server-template.properties").read_text())
        return template.substitute(
            host=host,
            port=port,
            controller_port=self.controller_port,
            log_dirs=self.data_dir,
            max_message_bytes=self.settings.kafka_max_message_bytes,
        )

    @property
    def config_path(self) -> Path:
        """Broker config written at each start."""
        return self.run_dir / "server.properties"

    def _format_storage(self) -> None:
        cluster_id = new_cluster_id()
        logger.info("service=kafka formatting KRaft storage cluster_id=%s dir=%s", cluster_id, self.data_dir)
        run_build_step(
            [*self._java_prefix(), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config_path)],
            service=self.name,
            log_path=self.log_path,
            cwd=self.run_dir,
            timeout_s=120,
        )

    def _java_prefix(self) -> list[str]:
        # Java expands the "libs/*" class path wildcard itself, so no shell is needed.
        return [
            "java",
            *HEAP_OPTIONS,
            "-cp",
            f"{self.libs_dir}/*",
            f"-Dlog4j.configuration=file:{self.run_dir / 'log4j.properties'}",
        ]

    def command(self) -> list[str]:
        """Return the broker command line."""
        return [*self._java_prefix(), "kafka.Kafka", str(self.config_path)]

    def is_ready(self) -> bool:
        """Send a metadata request (describe cluster); return whether a broker is listed."""
        # aiokafka logs an ERROR for every refused connection, so try a plain TCP connect first.
        if not accepts_connections(*self.host_port):
            return False
        try:
            return bool(_run_coroutine(self._describe_cluster()))
        except (KafkaError, OSError, TimeoutError) as error:
            logger.debug("service=kafka probe failed error=%s", error)
            return False

    async def _describe_cluster(self) -> list[Any]:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.address,
            request_timeout_ms=int(PROBE_TIMEOUT_S * 1000),
            client_id="crc-medai-stack-probe",
        )
        try:
            await asyncio.wait_for(admin.start(), PROBE_TIMEOUT_S)
            cluster = await asyncio.wait_for(admin.describe_cluster(), PROBE_TIMEOUT_S)
        finally:
            await admin.close()
        return list(cluster.get("brokers", []))


def new_cluster_id() -> str:
    """Return a random KRaft cluster id in the form ``kafka-storage random-uuid`` prints.

    Kafka's ``Uuid.randomUuid`` prints 16 random bytes as URL-safe base64
    without padding. It redraws ids that start with "-" (Kafka 3.9), and ids
    that contain "-" in later releases. This function applies the stricter rule.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if "-" not in text:
            return text


def _run_coroutine(coroutine: Coroutine[Any, Any, list[Any]]) -> list[Any]:
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()
