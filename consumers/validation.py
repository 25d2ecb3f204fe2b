"""FHIR R4 conformance checks with the HAPI FHIR instance validator.

The validator runs in a Java harness, ``infra/fhir-validator`` (a Maven
project that pins the HAPI FHIR version). :func:`ensure_validator_jar` builds it
once into ``$CRC_STACK_HOME/fhir-validator-<hapi version>-<source digest>/``
(default ``~/.cache/crc-medai``) with ``mvn -q -B package``.
:class:`ValidatorProcess` starts it as a local HTTP server, because loading the
R4 definitions takes seconds and validating one resource then takes
milliseconds, and returns each response as a :class:`ValidationReport`.

The harness also loads the HL7 Terminology (THO) package, whose current
editions of the terminology.hl7.org code systems replace those published with
R4 in 2019 (v3-ObservationValue gained AIAST after R4, for example). The build
fetches its npm tarball once with ``npm pack`` into the cache folder and puts
it in the build's ``packages/`` folder, so validation never fetches anything.

The severity policy lives in the harness (``SeverityPolicy.java``): an issue
that only says a code could not be checked because its code system (SNOMED CT,
LOINC, a local one) is not available offline is downgraded to information, and
every other error or fatal issue is a failure. docs/fhir-conformance.md explains
the policy and lists what the validator accepts and rejects.

Validate files from a shell with ``python -m consumers.validation PATH...``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx

from crc_medai.errors import CrcMedAiError
from infra.layout import StackLayout

logger = logging.getLogger(__name__)

HARNESS_DIR = Path(__file__).resolve().parent.parent / "infra" / "fhir-validator"
JAR_NAME = "fhir-validator.jar"
MIN_JAVA_MAJOR = 17
#: Severities of OperationOutcome issues that make a resource invalid.
FAILURE_SEVERITIES = frozenset({"fatal", "error"})
#: Folder of the build output that contains the terminology package, where the harness looks for it.
PACKAGES_DIR_NAME = "packages"
#: Seconds allowed for the first Maven build, which downloads about 190 MB of jars and plugins.
BUILD_TIMEOUT_S = 900.0
#: Seconds allowed for ``npm pack`` of the terminology package (4.6 MB for hl7.terminology.r4 7.0.1).
FETCH_TIMEOUT_S = 300.0
#: Seconds allowed from starting the JVM to the READY line, most of which loading the R4 definitions takes.
START_TIMEOUT_S = 180.0
#: Seconds allowed for one validation request. A Bundle of 1,000 entries took 7 to 27 s on 2 cores.
REQUEST_TIMEOUT_S = 300.0
#: JVM options of the validator. With the R4 definitions and the terminology package loaded its resident memory
#: is 835 to 875 MB, and about 400 MB of the heap stays in use.
JVM_OPTIONS = ("-Xmx1g", "-XX:+UseSerialGC")

_POM_NAMESPACE = {"pom": "http://maven.apache.org/POM/4.0.0"}
_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')
_READY_LINE = re.compile(r"^READY port=(\d+)")


class ValidatorError(CrcMedAiError):
    """Root of the errors of the FHIR validation harness."""


class ValidatorToolMissingError(ValidatorError):
    """Java or Maven, needed to build and run the harness, is missing or too old."""


class ValidatorBuildError(ValidatorError):
    """The Maven build of the harness failed."""


class TerminologyFetchError(ValidatorBuildError):
    """``npm pack`` could not fetch the terminology package that pom.xml pins."""


class ValidatorStartError(ValidatorError):
    """The validator process exited or was not ready in time."""


class ValidatorRequestError(ValidatorError):
    """A validation request failed: no response, or a response that is not an OperationOutcome."""


@dataclass(frozen=True)
class Issue:
    """One ``OperationOutcome.issue`` from the validator."""

    severity: str
    code: str
    diagnostics: str
    location: str
    message_id: str | None

    @classmethod
    def from_json(cls, issue: Mapping[str, Any]) -> Issue:
        """Read an issue of an R4 OperationOutcome in JSON."""
        locations = issue.get("expression") or issue.get("location") or [""]
        message_id = None
        for extension in issue.get("extension", []):
            if extension.get("url", "").endswith("operationoutcome-message-id"):
                message_id = extension.get("valueString")
        return cls(
            severity=issue.get("severity", "error"),
            code=issue.get("code", "unknown"),
            diagnostics=issue.get("diagnostics") or issue.get("details", {}).get("text", ""),
            location=locations[0],
            message_id=message_id,
        )

    @property
    def is_failure(self) -> bool:
        """True for the severities that make a resource invalid (error, fatal)."""
        return self.severity in FAILURE_SEVERITIES

    def __str__(self) -> str:
        return f"{self.severity} {self.location}: {self.diagnostics}"


@dataclass(frozen=True)
class ValidationReport:
    """The validator's OperationOutcome for one resource, after the severity policy."""

    outcome: dict[str, Any]

    @property
    def issues(self) -> list[Issue]:
        """Every issue, in the validator's order."""
        return [Issue.from_json(issue) for issue in self.outcome.get("issue", [])]

    @property
    def errors(self) -> list[Issue]:
        """Issues of severity error or fatal."""
        return [issue for issue in self.issues if issue.is_failure]

    @property
    def warnings(self) -> list[Issue]:
        """Issues of severity warning."""
        return [issue for issue in self.issues if issue.severity == "warning"]

    @property
    def is_valid(self) -> bool:
        """True when no issue is an error or fatal."""
        return not self.errors

    def describe(self, *, include_warnings: bool = False) -> str:
        """Render the errors (and warnings if asked), one per line, for messages and the command line."""
        lines = [str(issue) for issue in (self.issues if include_warnings else self.errors)]
        summary = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s), {len(self.issues)} issue(s)"
        return "\n".join([summary, *("  " + line for line in lines)])


# Building the harness


def hapi_version(pom_path: Path = HARNESS_DIR / "pom.xml") -> str:
    """Return the HAPI FHIR version pinned in the harness's pom.xml (property ``hapi.version``)."""
    return _pom_property(pom_path, "hapi.version", "the HAPI FHIR version")


@dataclass(frozen=True)
class TerminologyPackage:
    """The npm package of HL7 terminology that the harness loads, as pinned in pom.xml."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        """The package as ``npm pack`` takes it, ``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        """File name that ``npm pack`` gives the tarball."""
        return f"{self.name}-{self.version}.tgz"


def terminology_package(pom_path: Path = HARNESS_DIR / "pom.xml") -> TerminologyPackage:
    """Return the terminology package pinned in pom.xml (``terminology.package``, ``terminology.version``)."""
    return TerminologyPackage(
        name=_pom_property(pom_path, "terminology.package", "the npm name of the HL7 Terminology package"),
        version=_pom_property(pom_path, "terminology.version", "the version of the HL7 Terminology package"),
    )


def _pom_property(pom_path: Path, name: str, meaning: str) -> str:
    root = ElementTree.parse(pom_path).getroot()
    value = root.findtext(f"pom:properties/pom:{name}", namespaces=_POM_NAMESPACE)
    if not value:
        raise ValidatorBuildError(f"{pom_path} has no <properties><{name}>; pin {meaning} there")
    return value.strip()


def harness_digest(harness_dir: Path = HARNESS_DIR) -> str:
    """Return a short SHA-256 over pom.xml and src/, so an edited harness gets a new cache folder."""
    digest = hashlib.sha256()
    files = [harness_dir / "pom.xml", *sorted(path for path in (harness_dir / "src").rglob("*") if path.is_file())]
    for path in files:
        digest.update(path.relative_to(harness_dir).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def validator_cache_dir(layout: StackLayout | None = None) -> Path:
    """Return the cache folder of the current harness build (it may not exist yet)."""
    layout = layout or StackLayout.from_env()
    return layout.cache_dir("fhir-validator", f"{hapi_version()}-{harness_digest()}")


def ensure_validator_jar(layout: StackLayout | None = None) -> Path:
    """Return the harness jar, building it with Maven first when it is not in the cache.

    A file lock keeps two processes from building at once; the second waits and
    reuses the first one's build.

    Raises:
        ValidatorToolMissingError: Java 17+, Maven or npm is not installed.
        TerminologyFetchError: ``npm pack`` failed; the message names the command.
        ValidatorBuildError: The Maven build failed; the message names its log.
    """
    target = validator_cache_dir(layout)
    jar = target / JAR_NAME
    if jar.is_file():
        return jar

    java_executable()
    maven = _require_tool("mvn", "install Maven 3, for example `apt-get install -y maven`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "fhir-validator.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if jar.is_file():
            return jar
        tarball = fetch_terminology_package(target.parent)
        _build(maven, target, tarball)
    return jar


def fetch_terminology_package(
    cache_dir: Path, package: TerminologyPackage | None = None, *, timeout_s: float = FETCH_TIMEOUT_S
) -> Path:
    """Return the terminology package's tarball in ``cache_dir``, fetching it with ``npm pack`` when absent.

    Raises:
        ValidatorToolMissingError: The tarball is absent and npm is not installed.
        TerminologyFetchError: ``npm pack`` failed, timed out or wrote no tarball.
    """
    package = package or terminology_package()
    tarball = cache_dir / package.tarball_name
    if tarball.is_file():
        return tarball

    npm = _require_tool("npm", "install Node.js with npm, for example `apt-get install -y npm`")

    # npm pack writes into a fresh folder first, so an interrupted fetch never leaves a partial tarball.
    staging = Path(tempfile.mkdtemp(prefix=".npm-pack-", dir=cache_dir))
    command = [npm, "pack", package.spec, "--pack-destination", str(staging)]
    manual_command = f"npm pack {package.spec} --pack-destination {cache_dir}"
    logger.info("fetching terminology package=%s into=%s", package.spec, cache_dir)
    try:
        completed = subprocess.run(command, cwd=staging, capture_output=True, text=True, timeout=timeout_s, check=False)
        fetched = staging / package.tarball_name
        if completed.returncode != 0 or not fetched.is_file():
            detail = (completed.stderr or completed.stdout).strip()[-600:]
            raise TerminologyFetchError(
                f"`{manual_command}` failed with exit code {completed.returncode}: {detail}; the npm registry must be "
                "reachable for the first build, or put the tarball there by hand"
            )
        fetched.replace(tarball)
    except subprocess.TimeoutExpired as error:
        raise TerminologyFetchError(
            f"`{manual_command}` timed out after {timeout_s:.0f} s; check that the npm registry is reachable"
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("terminology package fetched path=%s bytes=%d", tarball, tarball.stat().st_size)
    return tarball


def _build(maven: str, target: Path, terminology_tarball: Path) -> None:
    build_dir = target.with_name(target.name + ".build")
    shutil.rmtree(build_dir, ignore_errors=True)
    shutil.copytree(HARNESS_DIR, build_dir, ignore=shutil.ignore_patterns("target", "*.md"))
    log_path = target.with_name(target.name + ".build.log")

    logger.info("building FHIR validator hapi=%s into=%s log=%s", hapi_version(), target, log_path)
    started = time.monotonic()
    with open(log_path, "w") as log:
        try:
            completed = subprocess.run(
                [maven, "-q", "-B", "package"],
                cwd=build_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise ValidatorBuildError(
                f"the Maven build of {HARNESS_DIR} timed out after {BUILD_TIMEOUT_S:.0f} s; see {log_path}"
            ) from error
    if completed.returncode != 0:
        raise ValidatorBuildError(
            f"the Maven build of {HARNESS_DIR} failed with exit code {completed.returncode}; "
            f"see {log_path} (Maven Central must be reachable for the first build)"
        )

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shutil.move(build_dir / "target" / JAR_NAME, staging / JAR_NAME)
    shutil.move(build_dir / "target" / "lib", staging / "lib")
    (staging / PACKAGES_DIR_NAME).mkdir()
    shutil.copy2(terminology_tarball, staging / PACKAGES_DIR_NAME / terminology_tarball.name)
    staging.replace(target)
    shutil.rmtree(build_dir, ignore_errors=True)
    logger.info("FHIR validator built seconds=%.1f jar=%s", time.monotonic() - started, target / JAR_NAME)
    _remove_stale_builds(target)


def _remove_stale_builds(current: Path) -> None:
    """Delete the builds of earlier harness sources, because each contains about 145 MB of jars."""
    for stale in current.parent.glob("fhir-validator-*"):
        if stale.is_dir() and stale != current and not stale.name.endswith((".build", ".partial")):
            logger.info("removing stale FHIR validator build path=%s", stale)
            shutil.rmtree(stale, ignore_errors=True)
            stale.with_name(stale.name + ".build.log").unlink(missing_ok=True)


def java_executable() -> str:
    """Return the ``java`` of ``JAVA_HOME``, else the one on PATH, after checking that it is Java 17 or newer.

    Raises:
        ValidatorToolMissingError: Java is missing or older than 17.
    """
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        java = str(Path(java_home) / "bin" / "java")
    else:
        java = _require_tool("java", "install Java 17, for example `apt-get install -y openjdk-17-jre-headless`")

    output = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = _JAVA_VERSION.search(output)
    if match is None:
        logger.warning("could not read the Java version java=%s output=%r", java, output[:200])
        return java

    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    if major < MIN_JAVA_MAJOR:
        raise ValidatorToolMissingError(
            f"Java {major} found at {java}, but HAPI FHIR {hapi_version()} needs Java {MIN_JAVA_MAJOR} or newer; "
            "install it or point JAVA_HOME at one"
        )
    return java


def _require_tool(executable: str, install_hint: str) -> str:
    path = shutil.which(executable)
    if path is None:
        raise ValidatorToolMissingError(
            f"{executable} not found on PATH; the FHIR validator harness needs it: {install_hint}"
        )
    return path


# Running the validator


class ValidatorProcess:
    """The harness running as a local HTTP server, started once and used for many resources.

    Use it as a context manager. The server listens on 127.0.0.1 on a free port
    and exits when its standard input closes, so it never outlives this process.
    """

    def __init__(self, jar: Path | None = None, *, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.jar = jar
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.load_ms: int | None = None
        self._process: subprocess.Popen[str] | None = None
        self._client: httpx.Client | None = None
        self._log: IO[str] | None = None
        self._keep_log = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @property
    def log_path(self) -> Path | None:
        """File that receives the validator's stderr; close() deletes it unless the validator failed."""
        return Path(self._log.name) if self._log else None

    def start(self) -> None:
        """Build the jar when needed, start the JVM and wait for its READY line.

        Raises:
            ValidatorStartError: The JVM exited or did not print READY within ``start_timeout_s``.
        """
        jar = self.jar or ensure_validator_jar()
        self._log = tempfile.NamedTemporaryFile("w", prefix="fhir-validator-", suffix=".log", delete=False)
        command = [java_executable(), *JVM_OPTIONS, "-jar", str(jar), "serve", "--host", "127.0.0.1", "--port", "0"]
        started = time.monotonic()
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True
        )

        line = self._read_ready_line()
        match = _READY_LINE.match(line)
        if match is None:
            self._keep_log = True
            self.close()
            raise ValidatorStartError(
                f"the FHIR validator printed {line!r} instead of 'READY port=N'; see {self.log_path}"
            )
        self.port = int(match.group(1))
        load_match = re.search(r"load_ms=(\d+)", line)
        self.load_ms = int(load_match.group(1)) if load_match else None
        self._client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=REQUEST_TIMEOUT_S)
        logger.info(
            "FHIR validator started port=%s load_ms=%s start_s=%.1f jar=%s",
            self.port,
            self.load_ms,
            time.monotonic() - started,
            jar,
        )

    def _read_ready_line(self) -> str:
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=min(1.0, max(deadline - time.monotonic(), 0.0))):
                    line = self._process.stdout.readline()
                    if line:
                        return line.strip()
                if self._process.poll() is not None:
                    code = self._process.returncode
                    self._keep_log = True
                    self.close()
                    raise ValidatorStartError(
                        f"the FHIR validator exited with code {code} during start-up; see {self.log_path}"
                    )
        self._keep_log = True
        self.close()
        raise ValidatorStartError(
            f"the FHIR validator was not ready within {self.start_timeout_s:.0f} s; see {self.log_path}"
        )

    def validate(self, resource: Mapping[str, Any] | str | bytes) -> ValidationReport:
        """Validate one FHIR R4 resource (a JSON object, or JSON or XML text) against the base R4 profiles.

        Raises:
            ValidatorRequestError: The validator is not running or did not return an OperationOutcome.
        """
        if self._client is None:
            raise ValidatorRequestError("the FHIR validator is not running; call start() or use it in a with block")
        if isinstance(resource, Mapping):
            body = json.dumps(resource).encode("utf-8")
        elif isinstance(resource, str):
            body = resource.encode("utf-8")
        else:
            body = resource

        try:
            response = self._client.post("/validate", content=body, headers={"Content-Type": "application/fhir+json"})
        except httpx.HTTPError as error:
            raise ValidatorRequestError(f"POST /validate to the FHIR validator failed: {error}") from error
        return _report_from_response(response)

    def request(self, method: str, path: str, body: bytes = b"") -> httpx.Response:
        """Send a raw request to the validator server, for checks of its HTTP behaviour."""
        if self._client is None:
            raise ValidatorRequestError("the FHIR validator is not running; call start() or use it in a with block")
        return self._client.request(method, path, content=body)

    def close(self) -> None:
        """Stop the server by closing its standard input, and kill it if it has not exited after 10 s."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            process, self._process = self._process, None
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("FHIR validator did not exit after stdin closed; killing pid=%s", process.pid)
                process.kill()
                process.wait()
                self._keep_log = True
            if process.stdout is not None:
                process.stdout.close()
            logger.info("FHIR validator stopped exit_code=%s", process.returncode)
            self._keep_log = self._keep_log or process.returncode != 0
        if self._log is not None:
            self._log.close()
            if not self._keep_log:
                Path(self._log.name).unlink(missing_ok=True)


def _report_from_response(response: httpx.Response) -> ValidationReport:
    try:
        outcome = response.json()
    except ValueError as error:
        raise ValidatorRequestError(
            f"the FHIR validator responded with HTTP {response.status_code} and a body that is not JSON: "
            f"{response.text[:200]!r}"
        ) from error
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        raise ValidatorRequestError(
            f"the FHIR validator responded with HTTP {response.status_code} but no OperationOutcome: "
            f"{response.text[:200]!r}"
        )
    if response.status_code != 200:
        raise ValidatorRequestError(
            f"the FHIR validator rejected the request with HTTP {response.status_code}: "
            f"{ValidationReport(outcome).describe()}"
        )
    return ValidationReport(outcome)


# Command line


def iter_resource_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Yield the files named, expanding each folder to its ``*.json`` and ``*.xml`` files in name order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(item for item in path.iterdir() if item.suffix in {".json", ".xml"} and item.is_file())
        else:
            yield path


def run_validate_command(
    paths: Sequence[Path],
    *,
    validator: ValidatorProcess | None = None,
    verbose: bool = False,
    out: IO[str] | None = None,
) -> int:
    """Validate FHIR R4 files and print one summary per file with its errors.

    Args:
        paths: Files, or folders whose ``*.json`` and ``*.xml`` files are validated.
        validator: A running validator to reuse; by default one is started and stopped here.
        verbose: Print warnings and information issues too.
        out: Where to print; standard output by default.

    Returns:
        0 when every file is valid, 1 when any file is invalid or missing.
    """
    out = out or sys.stdout
    files = list(iter_resource_files(paths))
    if not files:
        print("no FHIR files found; pass JSON or XML files or folders that contain them", file=out)
        return 1

    if validator is None:
        with ValidatorProcess() as started:
            return _validate_and_print(files, started, verbose, out)
    return _validate_and_print(files, validator, verbose, out)


def _validate_and_print(files: list[Path], validator: ValidatorProcess, verbose: bool, out: IO[str]) -> int:
    failed = 0
    for path in files:
        if not path.is_file():
            print(f"{path}: not found; pass the path of a FHIR R4 JSON or XML file", file=out)
            failed += 1
            continue
        report = validator.validate(path.read_bytes())
        verdict = "valid" if report.is_valid else "INVALID"
        print(f"{path}: {verdict}, {report.describe(include_warnings=verbose)}", file=out)
        failed += not report.is_valid
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m consumers.validation PATH...``."""
    parser = argparse.ArgumentParser(
        prog="python -m consumers.validation",
        description="Validate FHIR R4 resources with the HAPI FHIR instance validator (base R4 profiles).",
    )
    parser.add_argument("paths", type=Path, nargs="+", help="FHIR R4 JSON or XML files, or folders of them")
    parser.add_argument("-v", "--verbose", action="store_true", help="print warnings and information issues too")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_validate_command(args.paths, verbose=args.verbose)
    except ValidatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
