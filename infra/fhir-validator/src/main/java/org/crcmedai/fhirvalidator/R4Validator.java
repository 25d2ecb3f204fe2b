package org.crcmedai.fhirvalidator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.parser.DataFormatException;
import ca.uhn.fhir.rest.server.exceptions.InvalidRequestException;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import com.google.gson.JsonParseException;
import java.nio.file.Path;
import java.util.List;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;

/**
 * The HAPI FHIR instance validator set up with the FHIR R4 (4.0.1) core definitions, the HL7 Terminology (THO)
 * package and no terminology server.
 *
 * <p>The support chain contains the CodeSystems and ValueSets of {@link TerminologyPackage}, then the R4 core
 * StructureDefinitions, ValueSets and CodeSystems. The chain returns the first match, so THO's current editions of
 * the terminology.hl7.org code systems win over those published with R4. It ends with HAPI's built-in code systems (UCUM, BCP-47, MIME types,
 * ISO 3166 and 4217), in-memory value set expansion and snapshot generation. SNOMED CT, LOINC and other external
 * code systems are not loaded, so codes from them are not checked, and {@link SeverityPolicy} decides what those
 * issues mean.
 */
public final class R4Validator {

    private final FhirContext context;
    private final FhirValidator validator;

    private final TerminologyPackage terminology;

    /** Loads the terminology package from {@link TerminologyPackage#defaultPath()}. */
    public R4Validator() throws TerminologyPackage.LoadException {
        this(TerminologyPackage.defaultPath());
    }

    public R4Validator(Path terminologyPackage) throws TerminologyPackage.LoadException {
        context = FhirContext.forR4();
        terminology = TerminologyPackage.load(context, terminologyPackage);
        ValidationSupportChain support = new ValidationSupportChain(
                terminology.support(),
                new DefaultProfileValidationSupport(context),
                new CommonCodeSystemsTerminologyService(context),
                new InMemoryTerminologyServerValidationSupport(context),
                new SnapshotGeneratingValidationSupport(context));
        FhirInstanceValidator instanceValidator = new FhirInstanceValidator(support);
        validator = context.newValidator();
        validator.registerValidatorModule(instanceValidator);
    }

    /** Returns the terminology package in the support chain. */
    public TerminologyPackage terminology() {
        return terminology;
    }

    /** Returns the FHIR context the validator uses, for parsing and encoding. */
    public FhirContext context() {
        return context;
    }

    /**
     * Validates one FHIR R4 resource, given as JSON or XML text, against the base R4 profiles.
     *
     * @return the validator's issues after {@link SeverityPolicy#apply}; text that is neither JSON nor XML comes
     *     back as one fatal issue rather than an exception
     */
    public ValidationResult validate(String resourceText) {
        ValidationResult raw;
        try {
            raw = validator.validateWithResult(resourceText);
        } catch (InvalidRequestException | DataFormatException | JsonParseException error) {
            return unreadable(error.getMessage());
        }
        List<SingleValidationMessage> messages = SeverityPolicy.apply(raw.getMessages());
        return new ValidationResult(context, messages);
    }

    private ValidationResult unreadable(String detail) {
        SingleValidationMessage message = new SingleValidationMessage();
        message.setSeverity(ResultSeverityEnum.FATAL);
        message.setLocationString("(document)");
        message.setMessage("the input is not a FHIR resource in JSON or XML; send one resource per request ("
                + detail + ")");
        return new ValidationResult(context, List.of(message));
    }

    /** Encodes a result as an R4 OperationOutcome in JSON, one issue per validator message. */
    public String outcomeJson(ValidationResult result) {
        return context.newJsonParser().setPrettyPrint(false).encodeResourceToString(result.toOperationOutcome());
    }
}
