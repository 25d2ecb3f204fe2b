package org.crcmedai.fhirvalidator;

import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Command line of the FHIR R4 validation harness.
 *
 * <pre>
 * java -jar fhir-validator.jar validate [--json] [--terminology TGZ] FILE...
 * java -jar fhir-validator.jar serve [--host 127.0.0.1] [--port 0] [--threads 1] [--terminology TGZ]
 * </pre>
 *
 * <p>{@code validate} prints each file's issues (or its OperationOutcome with {@code --json}) and exits 1 when any
 * file has an error after {@link SeverityPolicy}, 2 on a usage error. {@code serve} prints
 * {@code READY port=N} on stdout once the R4 definitions are loaded, and exits when its standard input closes,
 * so the server never outlives the process that started it. It handles requests on {@code --threads} worker
 * threads, and the default of 1 validates one resource at a time.
 *
 * <p>{@code --terminology} names the HL7 Terminology npm tarball, by default
 * {@code packages/hl7.terminology.r4-<version>.tgz} beside the jar. Both commands exit 2 when it cannot be loaded.
 */
public final class Main {

    /** Minimal Observation validated once before READY, so the first caller does not wait for loading. */
    private static final String WARM_UP = "{\"resourceType\":\"Observation\",\"status\":\"final\","
            + "\"code\":{\"text\":\"warm-up\"},\"valueQuantity\":{\"value\":1,\"system\":\"http://unitsofmeasure.org\","
            + "\"code\":\"1\"}}";

    private static final Logger LOG = LoggerFactory.getLogger(Main.class);

    private Main() {}

    public static void main(String[] args) throws Exception {
        if (args.length == 0) {
            usage("a command is missing");
        }
        List<String> rest = List.of(args).subList(1, args.length);
        switch (args[0]) {
            case "validate" -> System.exit(validateFiles(rest));
            case "serve" -> serve(rest);
            default -> usage("unknown command '" + args[0] + "'");
        }
    }

    /** HAPI FHIR version on the class path. */
    static String hapiVersion() {
        return ca.uhn.fhir.util.VersionUtil.getVersion();
    }

    private static int validateFiles(List<String> args) throws IOException {
        boolean json = args.contains("--json");
        Path terminology = terminologyOption(args);
        List<String> files = new ArrayList<>(args);
        files.remove("--json");
        int terminologyIndex = files.indexOf("--terminology");
        if (terminologyIndex >= 0) {
            files.subList(terminologyIndex, terminologyIndex + 2).clear();
        }
        if (files.isEmpty()) {
            usage("validate needs at least one FILE");
        }

        R4Validator validator = loadValidator(terminology);
        int failed = 0;
        for (String file : files) {
            Path path = Path.of(file);
            if (!Files.isRegularFile(path)) {
                System.err.println(file + ": not found or not a file; pass the path of a FHIR R4 JSON or XML file");
                failed++;
                continue;
            }
            ValidationResult result = validator.validate(Files.readString(path, StandardCharsets.UTF_8));
            if (json) {
                System.out.println(validator.outcomeJson(result));
            } else {
                printIssues(file, result);
            }
            failed += countFailures(result) > 0 ? 1 : 0;
        }
        return failed > 0 ? 1 : 0;
    }

    private static long countFailures(ValidationResult result) {
        return result.getMessages().stream().filter(SeverityPolicy::isFailure).count();
    }

    private static void printIssues(String file, ValidationResult result) {
        long failures = countFailures(result);
        System.out.println(file + ": " + (failures == 0 ? "valid" : "INVALID") + ", " + failures + " error(s), "
                + result.getMessages().size() + " issue(s)");
        for (SingleValidationMessage message : result.getMessages()) {
            String severity = message.getSeverity() == null ? ResultSeverityEnum.ERROR.getCode()
                    : message.getSeverity().getCode();
            System.out.println("  " + severity + " " + message.getLocationString() + ": " + message.getMessage()
                    + (message.getMessageId() == null ? "" : " [" + message.getMessageId() + "]"));
        }
    }

    private static void serve(List<String> args) throws IOException {
        String host = option(args, "--host", "127.0.0.1");
        int port = Integer.parseInt(option(args, "--port", "0"));
        int threads = Integer.parseInt(option(args, "--threads", "1"));

        Path terminology = terminologyOption(args);

        long started = System.nanoTime();
        R4Validator validator = loadValidator(terminology);
        validator.validate(WARM_UP);
        ValidationServer server = new ValidationServer(validator, host, port, threads);
        server.start();
        long loadMs = (System.nanoTime() - started) / 1_000_000;

        System.out.println("READY port=" + server.port() + " hapi=" + hapiVersion() + " terminology="
                + validator.terminology().id() + " load_ms=" + loadMs);
        System.out.flush();
        waitForEndOfInput(System.in);
        server.stop();
        System.exit(0);
    }

    private static Path terminologyOption(List<String> args) {
        String path = option(args, "--terminology", null);
        return path == null ? TerminologyPackage.defaultPath() : Path.of(path);
    }

    /** Builds the validator, or exits 2 when the terminology package cannot be loaded. */
    private static R4Validator loadValidator(Path terminology) {
        long started = System.nanoTime();
        R4Validator validator;
        try {
            validator = new R4Validator(terminology);
        } catch (TerminologyPackage.LoadException error) {
            System.err.println("loading the terminology package failed: " + error.getMessage());
            System.exit(2);
            return null;
        }
        TerminologyPackage loaded = validator.terminology();
        LOG.info("validator loaded terminology={} code_systems={} value_sets={} path={} load_ms={}", loaded.id(),
                loaded.codeSystemCount(), loaded.valueSetCount(), terminology,
                (System.nanoTime() - started) / 1_000_000);
        return validator;
    }

    /** Blocks until standard input reaches end of file, which happens when the parent process exits. */
    private static void waitForEndOfInput(InputStream input) {
        try {
            while (input.read() != -1) {
                // The parent writes nothing; any byte read is ignored.
            }
        } catch (IOException error) {
            // A broken pipe means the parent is gone, the same as end of file.
        }
    }

    private static String option(List<String> args, String name, String fallback) {
        int index = args.indexOf(name);
        if (index < 0) {
            return fallback;
        }
        if (index + 1 >= args.size()) {
            usage(name + " needs a value");
        }
        return args.get(index + 1);
    }

    private static void usage(String problem) {
        System.err.println(problem);
        System.err.println("usage: java -jar fhir-validator.jar validate [--json] [--terminology TGZ] FILE...");
        System.err.println("       java -jar fhir-validator.jar serve [--host 127.0.0.1] [--port 0] [--threads 1]"
                + " [--terminology TGZ]");
        System.exit(2);
    }
}
