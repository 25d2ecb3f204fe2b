package org.crcmedai.fhirvalidator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.parser.IParser;
import java.io.IOException;
import java.io.InputStream;
import java.net.URISyntaxException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.utilities.npm.NpmPackage;

/**
 * The HL7 Terminology (THO) package, {@code hl7.terminology.r4}, loaded from its npm tarball.
 *
 * <p>The R4 core package carries the terminology.hl7.org code systems as published with R4 in 2019. THO contains their
 * current editions, for example v3-ObservationValue 4.0.0 with the code AIAST, and the HL7 validator loads it by
 * default. The package name and version are pinned in pom.xml ({@code terminology.package},
 * {@code terminology.version}) and reach this class through the filtered {@code harness.properties}. The build puts
 * the tarball in {@code packages/} beside the jar, so validation never fetches it.
 */
public final class TerminologyPackage {

    private final String name;
    private final String version;
    private final int codeSystems;
    private final int valueSets;
    private final PrePopulatedValidationSupport support;

    private TerminologyPackage(
            String name, String version, int codeSystems, int valueSets, PrePopulatedValidationSupport support) {
        this.name = name;
        this.version = version;
        this.codeSystems = codeSystems;
        this.valueSets = valueSets;
        this.support = support;
    }

    /** Raised when the pinned terminology package is missing, unreadable or not the pinned version. */
    public static final class LoadException extends Exception {
        LoadException(String message, Throwable cause) {
            super(message, cause);
        }
    }

    /** Package name pinned in pom.xml, for example {@code hl7.terminology.r4}. */
    public static String pinnedName() {
        return harnessProperty("terminology.package");
    }

    /** Package version pinned in pom.xml, for example {@code 7.0.1}. */
    public static String pinnedVersion() {
        return harnessProperty("terminology.version");
    }

    /** Path of the pinned tarball in {@code packages/} beside the harness jar, named as {@code npm pack} names it. */
    public static Path defaultPath() {
        // The code source is the jar, or target/classes when run from an IDE, so packages/ is beside either.
        Path codeSource;
        try {
            codeSource = Path.of(TerminologyPackage.class.getProtectionDomain().getCodeSource().getLocation().toURI());
        } catch (URISyntaxException error) {
            throw new IllegalStateException("the location of the harness jar is not a valid URI", error);
        }
        return codeSource.getParent().resolve("packages").resolve(pinnedName() + "-" + pinnedVersion() + ".tgz");
    }

    /**
     * Reads the tarball and parses every CodeSystem and ValueSet in it into a validation support.
     *
     * @throws LoadException the file is missing or unreadable, or contains another package or version than pom.xml pins
     */
    public static TerminologyPackage load(FhirContext context, Path tarball) throws LoadException {
        if (!Files.isRegularFile(tarball)) {
            throw new LoadException(tarball + " not found; build the harness with consumers/validation.py, which "
                    + "fetches it, or run `npm pack " + pinnedName() + "@" + pinnedVersion() + " --pack-destination "
                    + tarball.getParent() + "`", null);
        }

        NpmPackage npm;
        try (InputStream input = Files.newInputStream(tarball)) {
            npm = NpmPackage.fromPackage(input);
        } catch (IOException | RuntimeException error) {
            throw new LoadException(tarball + " is not a readable npm package (" + error.getMessage()
                    + "); delete it and build the harness again", error);
        }
        if (!pinnedName().equals(npm.name()) || !pinnedVersion().equals(npm.version())) {
            throw new LoadException(tarball + " contains " + npm.name() + "#" + npm.version() + " but pom.xml pins "
                    + pinnedName() + "#" + pinnedVersion() + "; delete it and build the harness again", null);
        }

        try {
            return parse(context, npm);
        } catch (IOException error) {
            throw new LoadException("reading the resources of " + tarball + " failed: " + error.getMessage(), error);
        }
    }

    private static TerminologyPackage parse(FhirContext context, NpmPackage npm) throws IOException {
        IParser parser = context.newJsonParser();
        PrePopulatedValidationSupport support = new PrePopulatedValidationSupport(context);
        int codeSystems = 0;
        for (String file : npm.listResources("CodeSystem")) {
            support.addCodeSystem(read(parser, npm, file));
            codeSystems++;
        }
        int valueSets = 0;
        for (String file : npm.listResources("ValueSet")) {
            support.addValueSet(read(parser, npm, file));
            valueSets++;
        }
        return new TerminologyPackage(npm.name(), npm.version(), codeSystems, valueSets, support);
    }

    private static IBaseResource read(IParser parser, NpmPackage npm, String file) throws IOException {
        try (InputStream input = npm.loadResource(file)) {
            return parser.parseResource(new String(input.readAllBytes(), StandardCharsets.UTF_8));
        }
    }

    private static String harnessProperty(String key) {
        Properties properties = new Properties();
        try (InputStream input = TerminologyPackage.class.getResourceAsStream("/harness.properties")) {
            if (input == null) {
                throw new IllegalStateException("harness.properties is missing from the class path; rebuild the jar");
            }
            properties.load(input);
        } catch (IOException error) {
            throw new IllegalStateException("harness.properties could not be read", error);
        }
        String value = properties.getProperty(key);
        if (value == null || value.isBlank() || value.startsWith("${")) {
            throw new IllegalStateException("harness.properties has no value for " + key + "; pin it in pom.xml");
        }
        return value.trim();
    }

    /** Returns the package as {@code name#version}, the notation of FHIR package references. */
    public String id() {
        return name + "#" + version;
    }

    public String version() {
        return version;
    }

    public int codeSystemCount() {
        return codeSystems;
    }

    public int valueSetCount() {
        return valueSets;
    }

    /** Validation support with the package's CodeSystems and ValueSets. */
    public PrePopulatedValidationSupport support() {
        return support;
    }
}
