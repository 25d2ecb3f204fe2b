package org.crcmedai.fhirvalidator;

import ca.uhn.fhir.validation.ValidationResult;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * HTTP front end of {@link R4Validator} for callers that validate many resources, such as a test session.
 *
 * <p>{@code POST /validate} with one FHIR R4 resource (JSON or XML) as the body returns 200 and an
 * OperationOutcome in JSON. An empty body, a body over {@link #MAX_BODY_BYTES} or another method gets 4xx with an
 * OperationOutcome that gives the reason. {@code GET /health} returns 200 once the R4 definitions are loaded.
 */
public final class ValidationServer {

    private static final Logger LOG = LoggerFactory.getLogger(ValidationServer.class);

    /** Largest request body accepted, in bytes; a Bundle of 1,000 Observations is about 0.5 MB of compact JSON. */
    static final int MAX_BODY_BYTES = 32 * 1024 * 1024;

    private final R4Validator validator;
    private final HttpServer server;
    private final ExecutorService workers;

    public ValidationServer(R4Validator validator, String host, int port, int threads) throws IOException {
        this.validator = validator;
        this.server = HttpServer.create(new InetSocketAddress(host, port), 0);
        this.workers = Executors.newFixedThreadPool(threads);
        server.setExecutor(workers);
        server.createContext("/validate", this::handleValidate);
        server.createContext("/health", this::handleHealth);
    }

    public void start() {
        server.start();
        LOG.info("validation server started address={}", address());
    }

    public void stop() {
        server.stop(0);
        workers.shutdownNow();
        LOG.info("validation server stopped");
    }

    /** Returns the bound port, which the system chose when the server was created with port 0. */
    public int port() {
        return server.getAddress().getPort();
    }

    private String address() {
        return server.getAddress().getHostString() + ":" + port();
    }

    private void handleHealth(HttpExchange exchange) throws IOException {
        try (exchange) {
            send(exchange, 200, "{\"status\":\"ok\",\"hapiVersion\":\"" + Main.hapiVersion()
                    + "\",\"terminology\":\"" + validator.terminology().id() + "\"}");
        }
    }

    private void handleValidate(HttpExchange exchange) throws IOException {
        try (exchange) {
            try {
                validateRequest(exchange);
            } catch (RuntimeException error) {
                LOG.error("validation failed with an internal error", error);
                sendProblem(exchange, 500, "the validator failed: " + error);
            }
        }
    }

    private void validateRequest(HttpExchange exchange) throws IOException {
        if (!"POST".equals(exchange.getRequestMethod())) {
            exchange.getResponseHeaders().add("Allow", "POST");
            sendProblem(exchange, 405, exchange.getRequestMethod() + " is not allowed on /validate; use POST");
            return;
        }

        byte[] body = readBody(exchange.getRequestBody());
        if (body == null) {
            sendProblem(exchange, 413, "request body is over " + MAX_BODY_BYTES + " bytes; split the Bundle");
            return;
        }
        if (body.length == 0) {
            sendProblem(exchange, 400, "request body is empty; POST one FHIR R4 resource as JSON or XML");
            return;
        }

        long started = System.nanoTime();
        ValidationResult result = validator.validate(new String(body, StandardCharsets.UTF_8));
        LOG.debug("validated bytes={} issues={} ms={}", body.length, result.getMessages().size(),
                (System.nanoTime() - started) / 1_000_000);
        send(exchange, 200, validator.outcomeJson(result));
    }

    /** Reads the whole body, or returns null when it is over {@link #MAX_BODY_BYTES}. */
    private static byte[] readBody(InputStream input) throws IOException {
        byte[] body = input.readNBytes(MAX_BODY_BYTES + 1);
        return body.length > MAX_BODY_BYTES ? null : body;
    }

    private void sendProblem(HttpExchange exchange, int status, String diagnostics) throws IOException {
        org.hl7.fhir.r4.model.OperationOutcome outcome = new org.hl7.fhir.r4.model.OperationOutcome();
        outcome.addIssue()
                .setSeverity(org.hl7.fhir.r4.model.OperationOutcome.IssueSeverity.FATAL)
                .setCode(org.hl7.fhir.r4.model.OperationOutcome.IssueType.INVALID)
                .setDiagnostics(diagnostics);
        send(exchange, status, validator.context().newJsonParser().encodeResourceToString(outcome));
    }

    private static void send(HttpExchange exchange, int status, String json) throws IOException {
        byte[] bytes = json.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "application/fhir+json; charset=utf-8");
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream output = exchange.getResponseBody()) {
            output.write(bytes);
        }
    }
}
