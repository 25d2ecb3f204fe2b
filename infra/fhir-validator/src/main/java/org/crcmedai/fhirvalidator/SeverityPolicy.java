package org.crcmedai.fhirvalidator;

import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;

/**
 * Which validator issues count as failures when no terminology server is reachable.
 *
 * <p>An issue that only reports that a code could not be checked, because its code system (SNOMED CT, LOINC, ATC, a
 * local code system) or that code system version is not loaded here, is downgraded to information, whatever its
 * severity. Its text is prefixed with {@link #DOWNGRADED_PREFIX} so a reader sees what was downgraded. Every other
 * issue keeps its severity, and every error or fatal issue is a failure. In particular an unknown code in a code
 * system that is loaded (the R4 core code systems) stays an error.
 */
public final class SeverityPolicy {

    /** Prefix of the text of every downgraded issue; {@code %s} is the original severity. */
    public static final String DOWNGRADED_PREFIX = "[downgraded from %s: the code system is not available offline] ";

    /**
     * Message ids of "code system unknown" issues, from org.hl7.fhir.utilities.i18n.I18nConstants in
     * org.hl7.fhir.utilities 6.6.7, the version HAPI FHIR 8.6.5 uses.
     */
    static final Set<String> UNKNOWN_CODE_SYSTEM_IDS = Set.of(
            "UNKNOWN_CODESYSTEM",
            "UNKNOWN_CODESYSTEM_VERSION",
            "UNKNOWN_CODESYSTEM_VERSION_NONE",
            "Terminology_TX_System_Unknown",
            "TERMINOLOGY_TX_SYSTEM_NOT_USABLE");

    /**
     * HAPI passes terminology messages through under one id; this text marks the pass-through ones that mean
     * "code system unknown" (HAPI 8.6.5). Other pass-through texts, such as "Unknown code", are real errors.
     */
    static final String PASS_THROUGH_ID = "Terminology_PassThrough_TX_Message";
    static final String UNKNOWN_CODE_SYSTEM_TEXT = "CodeSystem is unknown and can't be validated";

    private SeverityPolicy() {}

    /** Returns {@code messages} with the uncheckable-code issues replaced by downgraded copies. */
    public static List<SingleValidationMessage> apply(List<SingleValidationMessage> messages) {
        List<SingleValidationMessage> result = new ArrayList<>(messages.size());
        for (SingleValidationMessage message : messages) {
            result.add(isUncheckableCode(message) && !isInformation(message) ? downgrade(message) : message);
        }
        return result;
    }

    /** Returns true for the severities that make a resource invalid: error and fatal. */
    public static boolean isFailure(SingleValidationMessage message) {
        ResultSeverityEnum severity = message.getSeverity();
        return severity == ResultSeverityEnum.ERROR || severity == ResultSeverityEnum.FATAL;
    }

    static boolean isUncheckableCode(SingleValidationMessage message) {
        String id = message.getMessageId();
        if (id == null) {
            return false;
        }
        if (UNKNOWN_CODE_SYSTEM_IDS.contains(id)) {
            return true;
        }
        String text = message.getMessage();
        return PASS_THROUGH_ID.equals(id) && text != null && text.startsWith(UNKNOWN_CODE_SYSTEM_TEXT);
    }

    private static boolean isInformation(SingleValidationMessage message) {
        return message.getSeverity() == ResultSeverityEnum.INFORMATION;
    }

    private static SingleValidationMessage downgrade(SingleValidationMessage message) {
        SingleValidationMessage copy = new SingleValidationMessage(message);
        copy.setSeverity(ResultSeverityEnum.INFORMATION);
        copy.setMessage(String.format(DOWNGRADED_PREFIX, message.getSeverity().getCode()) + message.getMessage());
        return copy;
    }
}
