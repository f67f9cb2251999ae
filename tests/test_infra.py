"""The azd infrastructure, checked offline: every Bicep file parses and says what we rely on.

pycep turns Bicep into JSON. Identifiers and string literals both come out as plain strings, so
the checks compare against names written in infra/ (parameters, variables, symbols) as well as
literal values; an expression such as `a.b.c` comes out as nested property accessors.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from pycep import BicepParser

from shared.platform import settings

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

# Settings the code reads that Azure deliberately leaves unset, each with its reason.
NOT_SET_IN_AZURE = {
    # The dev host's stand-in for function keys; in Azure the Functions host issues the keys.
    "AIPROXY_FUNCTION_KEY": "dev host only",
    # Local only: in Azure the app uses AIPROXY_STORAGE_TABLE_ENDPOINT with its identity, and a
    # connection string would need the shared key that the storage account refuses.
    "AIPROXY_STORAGE_CONNECTION_STRING": "local only",
}

# App settings Flex Consumption rejects or ignores: their job moved to functionAppConfig
# (runtime, scale, deployment package) or does not exist on Flex (content share, Oryx build).
FLEX_REJECTED_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION",
    "FUNCTIONS_EXTENSION_VERSION",
    "FUNCTIONS_MAX_HTTP_CONCURRENCY",
    "FUNCTIONS_WORKER_PROCESS_COUNT",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_CONTENTOVERVNET",
    "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
    "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
    "WEBSITE_NODE_DEFAULT_VERSION",
    "WEBSITE_TIME_ZONE",
    "WEBSITE_VNET_ROUTE_ALL",
    "WEBSITES_CONTAINER_START_TIME_LIMIT",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
    "ENABLE_ORYX_BUILD",
    "TZ",
    # A connection string for host storage would carry the account key; identity-based only.
    "AzureWebJobsStorage",
}

# Built-in role definition ids (the same in every tenant).
ROLES = {
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
    "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd": "Cognitive Services OpenAI User",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
}
STORAGE = "Microsoft.Storage/storageAccounts"
VAULT = "Microsoft.KeyVault/vaults"
SECRET = "Microsoft.KeyVault/vaults/secrets"
APP_INSIGHTS = "Microsoft.Insights/components"
OPENAI = "Microsoft.CognitiveServices/accounts"


# --- reading the parsed Bicep ---------------------------------------------------------------


@cache
def _parser() -> BicepParser:
    return BicepParser()


@cache
def bicep(name: str) -> dict[str, Any]:
    """The parsed file infra/<name>.bicep."""
    return _parser().parse(file_path=INFRA / f"{name}.bicep")


def unwrap(entry: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A resource's or module's body and its deploy condition (None when unconditional)."""
    config = entry["config"]
    if "loop_type" in config or ("condition" in config and "config" in config):
        return config["config"], config.get("condition")
    return config, None


def resources(doc: dict[str, Any], kind: str, *, existing: bool = False) -> dict[str, Any]:
    """The resources of one type in a parsed file, by symbol."""
    return {
        symbol: entry
        for symbol, entry in doc.get("resources", {}).items()
        if entry["type"] == kind and entry["existing"] == existing
    }


def only(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    (entry,) = resources(doc, kind).values()
    return unwrap(entry)[0]


def path(value: Any) -> list[str]:
    """`a.b.c` as ['a', 'b', 'c']; a plain name as [name]."""
    if isinstance(value, str):
        return [value]
    operator = value["operator"]
    assert operator["type"] == "property_accessor", value
    return path(operator["operands"]["operand_1"]) + path(operator["operands"]["operand_2"])


def call(value: Any, function: str) -> dict[str, Any]:
    assert value["function"]["type"] == function, value
    return value["function"].get("parameters", {})


def conditional(value: Any) -> dict[str, Any]:
    """The operands of `condition ? a : b`."""
    assert isinstance(value, dict) and value["operator"]["type"] == "conditional", value
    return value["operator"]["operands"]


def conditional_operand(condition: Any) -> Any:
    """The x in a deploy condition `!x`."""
    assert condition["operator"]["type"] == "not", condition
    return condition["operator"]["operands"]["bool_value"]


def site_config(name: str) -> tuple[dict[str, Any], Any]:
    """The Function app's config resource `name` (appsettings, authsettingsV2) and condition."""
    (entry,) = (
        entry
        for entry in resources(bicep("app/api"), "Microsoft.Web/sites/config").values()
        if unwrap(entry)[0]["name"] == name
    )
    return unwrap(entry)


def app_settings() -> dict[str, Any]:
    """Every app setting the Function app gets, with sign-in switched on."""
    api = bicep("app/api")
    config, condition = site_config("appsettings")
    assert condition is None
    union = call(config["properties"], "union")
    merged: dict[str, Any] = {}
    for name in union.values():
        value = api["variables"][name]["value"]
        merged.update(conditional(value)["true_value"] if "operator" in value else value)
    return merged


def role_assignments() -> list[dict[str, Any]]:
    """Every role assignment in infra/: role name, scope type, principal, condition."""
    found = []
    for file in BICEP_FILES:
        doc = bicep(str(file.relative_to(INFRA).with_suffix("")))
        for entry in resources(doc, "Microsoft.Authorization/roleAssignments").values():
            body, condition = unwrap(entry)
            role = call(body["properties"]["roleDefinitionId"], "subscription_resource_id")
            assert role["resource_type"] == "Microsoft.Authorization/roleDefinitions"
            role_id = doc["variables"][role["resource_name_1"]]["value"]
            found.append(
                {
                    "file": file.name,
                    "role": ROLES.get(role_id, role_id),
                    "scope": doc["resources"][body["scope"]]["type"],
                    "principal": body["properties"]["principalId"],
                    "principalType": body["properties"]["principalType"],
                    "condition": condition,
                }
            )
    return found


def decorators(param: dict[str, Any]) -> dict[str, Any]:
    return {d["type"]: d.get("argument") for d in param["decorators"]}


def main_parameters() -> dict[str, Any]:
    return json.loads((INFRA / "main.parameters.json").read_text())["parameters"]


def azd_option(parameter: str) -> tuple[str, str | None]:
    """The azd environment value behind a parameter, and its default: ${NAME=default}."""
    value = main_parameters()[parameter]["value"]
    match = re.fullmatch(r"\$\{(\w+)(?:=(.*))?\}", value)
    assert match, f"{parameter} is not fed from the azd environment: {value}"
    return match[1], match[2]


def scale() -> dict[str, Any]:
    """The Function app's functionAppConfig.scaleAndConcurrency."""
    site = only(bicep("app/api"), "Microsoft.Web/sites")
    return site["properties"]["functionAppConfig"]["scaleAndConcurrency"]


def load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("preprovision", INFRA / "hooks/preprovision.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the files parse and fit together -------------------------------------------------------


def test_there_is_a_main_template_with_modules_under_app() -> None:
    names = {str(file.relative_to(INFRA)) for file in BICEP_FILES}
    assert "main.bicep" in names
    assert {"app/api.bicep", "app/storage.bicep", "app/rbac.bicep", "app/keyvault.bicep"} <= names


@pytest.mark.parametrize("file", BICEP_FILES, ids=lambda f: str(f.relative_to(INFRA)))
def test_every_bicep_file_parses_offline(file: Path) -> None:
    assert bicep(str(file.relative_to(INFRA).with_suffix("")))


@pytest.mark.parametrize("file", BICEP_FILES, ids=lambda f: str(f.relative_to(INFRA)))
def test_every_module_gets_the_params_it_declares_and_no_others(file: Path) -> None:
    doc = bicep(str(file.relative_to(INFRA).with_suffix("")))
    for symbol, entry in doc.get("modules", {}).items():
        target = (file.parent / entry["detail"]["path"]).resolve()
        assert target.is_file(), f"{symbol}: {target} is missing"
        declared = bicep(str(target.relative_to(INFRA).with_suffix("")))["parameters"]
        passed = set(unwrap(entry)[0].get("params", {}))
        required = {name for name, param in declared.items() if param["default"] is None}
        assert passed <= set(declared), f"{symbol} passes unknown {passed - set(declared)}"
        assert required <= passed, f"{symbol} misses {required - passed}"


def test_location_is_limited_to_flex_consumption_regions() -> None:
    param = bicep("main")["parameters"]["location"]
    regions = decorators(param)["allowed"]
    assert {"eastus", "westeurope", "swedencentral", "australiaeast"} <= set(regions)
    # Regions without Flex Consumption in the published list.
    assert not {"westindia", "chinaeast2", "usgovvirginia"} & set(regions)
    assert all(re.fullmatch(r"[a-z0-9]+", region) for region in regions)
    assert decorators(param)["metadata"] == {"azd": {"type": "location"}}
    # The list says where it comes from and when it was read.
    text = (INFRA / "main.bicep").read_text().split("param location string")[0]
    assert "list-flexconsumption-locations" in text
    assert re.search(r"read \d{4}-\d{2}-\d{2}", text)


def test_main_deploys_a_resource_group_at_subscription_scope() -> None:
    main = bicep("main")
    assert main["globals"]["scope"]["value"] == "subscription"
    assert resources(main, "Microsoft.Resources/resourceGroups")
    for entry in main["modules"].values():
        assert unwrap(entry)[0]["scope"] == "rg"


def test_parameters_file_maps_the_azd_environment() -> None:
    declared = bicep("main")["parameters"]
    given = main_parameters()
    assert set(given) <= set(declared)
    assert {name for name, param in declared.items() if param["default"] is None} <= set(given)
    assert given["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert given["location"]["value"] == "${AZURE_LOCATION}"
    assert given["principalId"]["value"] == "${AZURE_PRINCIPAL_ID}"
    assert given["encryptionKey"]["value"] == "${AIPROXY_ENCRYPTION_KEY}"
    assert given["authEnabled"]["value"] == "${AIPROXY_AUTH_ENABLED=false}"


def test_azure_yaml_deploys_the_root_as_a_python_function_app() -> None:
    project = yaml.safe_load((ROOT / "azure.yaml").read_text())
    assert project["name"] == "aiproxy"
    assert project["services"] == {
        "api": {"project": ".", "language": "python", "host": "function"}
    }
    for platform in project["hooks"]["preprovision"].values():
        script = platform["run"].split()[-1]
        assert (ROOT / script).is_file()


# --- Flex Consumption, Python 3.13 ----------------------------------------------------------


def test_plan_is_flex_consumption_fc1() -> None:
    plan = only(bicep("app/api"), "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True


def test_function_app_runs_python_313_from_its_deployment_container() -> None:
    api = bicep("app/api")
    site = only(api, "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    config = site["properties"]["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.13"}
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["value"].endswith("${deploymentContainerName}")
    assert storage["authentication"]["type"] == "UserAssignedIdentity"
    assert path(storage["authentication"]["userAssignedIdentityResourceId"]) == ["identity", "id"]
    assert site["identity"]["type"] == "UserAssigned"
    assert path(site["properties"]["keyVaultReferenceIdentity"]) == ["identity", "id"]


def test_scale_is_2048_mb_instances_up_to_a_parameter_defaulting_to_100() -> None:
    api, main = bicep("app/api"), bicep("main")
    scale = only(api, "Microsoft.Web/sites")["properties"]["functionAppConfig"]
    scale = scale["scaleAndConcurrency"]
    assert scale["instanceMemoryMB"] == "instanceMemoryMB"
    assert api["parameters"]["instanceMemoryMB"]["default"] == 2048
    assert scale["maximumInstanceCount"] == "maximumInstanceCount"
    assert api["parameters"]["maximumInstanceCount"]["default"] == 100
    assert main["parameters"]["maximumInstanceCount"]["default"] == 100
    passed = unwrap(main["modules"]["api"])[0]["params"]
    assert passed["maximumInstanceCount"] == "maximumInstanceCount"


def test_maximum_instance_count_is_at_least_the_documented_lowest_40() -> None:
    for doc in (bicep("main"), bicep("app/api")):
        param = doc["parameters"]["maximumInstanceCount"]
        assert decorators(param)["min_value"] == 40
        assert decorators(param)["max_value"] == 1000
        assert "40" in decorators(param)["description"]
    main_description = decorators(bicep("main")["parameters"]["maximumInstanceCount"])[
        "description"
    ]
    assert "preview" in main_description
    assert azd_option("maximumInstanceCount") == ("AIPROXY_MAXIMUM_INSTANCE_COUNT", "100")


def test_http_concurrency_per_instance_comes_from_the_azd_environment() -> None:
    # Unset, Flex Consumption gives Python apps one HTTP call per instance.
    assert scale()["triggers"] == {"http": {"perInstanceConcurrency": "httpPerInstanceConcurrency"}}
    main, api = bicep("main"), bicep("app/api")
    for doc in (main, api):
        param = doc["parameters"]["httpPerInstanceConcurrency"]
        assert param["default"] == 64
        assert (decorators(param)["min_value"], decorators(param)["max_value"]) == (1, 1000)
    passed = unwrap(main["modules"]["api"])[0]["params"]
    assert passed["httpPerInstanceConcurrency"] == "httpPerInstanceConcurrency"
    assert azd_option("httpPerInstanceConcurrency") == ("AIPROXY_HTTP_CONCURRENCY", "64")


def test_always_ready_instances_are_sent_for_the_http_group_only_when_asked_for() -> None:
    # Part of every provision: a count set by hand with az would not survive the next one.
    always_ready = conditional(scale()["alwaysReady"])
    assert always_ready["condition"] == {
        "operator": {
            "type": "greater_than",
            "operands": {"operand_1": "alwaysReadyInstanceCount", "operand_2": 0},
        }
    }
    assert always_ready["true_value"] == [
        {"name": "http", "instanceCount": "alwaysReadyInstanceCount"}
    ]
    assert always_ready["false_value"] == []
    main, api = bicep("main"), bicep("app/api")
    for doc in (main, api):
        param = doc["parameters"]["alwaysReadyInstanceCount"]
        assert param["default"] == 0
        assert decorators(param)["min_value"] == 0
    passed = unwrap(main["modules"]["api"])[0]["params"]
    assert passed["alwaysReadyInstanceCount"] == "alwaysReadyInstanceCount"
    assert azd_option("alwaysReadyInstanceCount") == ("AIPROXY_ALWAYS_READY", "0")


# Microsoft.Web versions whose Bicep types (Azure/bicep-types-az, generated/web) have
# functionAppConfig, the Flex Consumption settings. None of them types siteUpdateStrategy.
TYPED_FLEX_SITE_VERSIONS = {"2023-12-01", "2024-04-01", "2024-11-01", "2025-03-01"}


def test_deployments_roll_instead_of_stopping_running_calls() -> None:
    # Recreate, the default, stops running executions (streams) on every deploy.
    api = bicep("app/api")
    (site,) = resources(api, "Microsoft.Web/sites").values()
    config = unwrap(site)[0]["properties"]["functionAppConfig"]
    assert config["siteUpdateStrategy"] == {"type": "RollingUpdate"}
    # Microsoft documents siteUpdateStrategy for ARM and Bicep from 2024-11-01 on.
    assert site["api_version"] >= "2024-11-01"


def test_function_app_uses_a_version_the_bicep_types_check() -> None:
    # An unknown version (2025-05-01 before) leaves the whole resource unchecked by Bicep.
    api = bicep("app/api")
    (site,) = resources(api, "Microsoft.Web/sites").values()
    assert site["api_version"] in TYPED_FLEX_SITE_VERSIONS
    assert site["api_version"] == max(TYPED_FLEX_SITE_VERSIONS)
    for child in resources(api, "Microsoft.Web/sites/config").values():
        assert child["api_version"] == site["api_version"]


def suppressions() -> list[tuple[str, str, str]]:
    """Every Bicep diagnostic suppression in infra/: file, the directive, the line it covers."""
    found = []
    for file in BICEP_FILES:
        lines = [line.strip() for line in file.read_text().splitlines()]
        for number, line in enumerate(lines):
            if line.startswith("#disable"):
                covered = lines[number + 1] if number + 1 < len(lines) else ""
                found.append((file.name, line, covered))
    return found


def test_the_one_suppression_is_the_unknown_property_site_update_strategy() -> None:
    # Only the property the types lack goes unchecked; every other one is type-checked.
    assert suppressions() == [("api.bicep", "#disable-next-line BCP037", "siteUpdateStrategy: {")]


def test_azd_finds_the_app_by_its_service_tag() -> None:
    site = only(bicep("app/api"), "Microsoft.Web/sites")
    assert call(site["tags"], "union")["arg_2"] == {"'azd-service-name'": "api"}


def test_app_sets_no_setting_flex_consumption_rejects() -> None:
    names = {name.lower() for name in app_settings()}
    assert not names & {name.lower() for name in FLEX_REJECTED_SETTINGS}


def test_http_streaming_gets_init_indexing() -> None:
    assert app_settings()["PYTHON_ENABLE_INIT_INDEXING"] == "1"


def test_azd_is_recent_enough_to_honour_funcignore() -> None:
    project = yaml.safe_load((ROOT / "azure.yaml").read_text())
    # azd reads .funcignore from 1.18.0 on; older versions package the whole directory.
    assert project["requiredVersions"] == {"azd": ">= 1.18.0"}


# --- every setting the code reads is provided -----------------------------------------------


def test_every_setting_the_code_reads_is_in_local_settings_example() -> None:
    example = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    assert set(settings.env_names()) <= set(example)


def test_every_setting_the_code_reads_is_set_in_azure_or_listed_as_not_set() -> None:
    read, provided = set(settings.env_names()), set(app_settings())
    assert set(NOT_SET_IN_AZURE) <= read, "the list names a setting the code no longer reads"
    assert not set(NOT_SET_IN_AZURE) & provided
    assert read - set(NOT_SET_IN_AZURE) <= provided


def test_azure_defaults_are_the_settings_module_defaults() -> None:
    parameters = set(bicep("app/api")["parameters"])  # a bare parameter is no literal
    literals = {
        name: value
        for name, value in app_settings().items()
        if name in settings.env_names()
        and isinstance(value, str)
        and "${" not in value
        and value not in parameters
    }
    assert settings.load(literals) == settings.load({})
    for name, default in settings.SCHEDULE_SETTINGS.items():
        assert literals[name] == default


# --- identity everywhere, no shared key -----------------------------------------------------


def test_storage_account_refuses_shared_keys_and_public_blobs() -> None:
    storage = bicep("app/storage")
    properties = only(storage, STORAGE)["properties"]
    assert properties["allowSharedKeyAccess"] is False
    assert properties["allowBlobPublicAccess"] is False
    assert properties["minimumTlsVersion"] == "TLS1_2"
    container = only(storage, "Microsoft.Storage/storageAccounts/blobServices/containers")
    assert container["name"] == "deploymentContainerName"
    assert container["properties"]["publicAccess"] == "None"


def test_no_template_reads_a_storage_key_or_builds_a_connection_string() -> None:
    for file in BICEP_FILES:
        text = file.read_text()
        for marker in ("listKeys", "listAccountSas", "listServiceSas", "AccountKey="):
            assert marker not in text, f"{file.name} uses {marker}"


def test_host_storage_is_identity_based() -> None:
    values = app_settings()
    assert path(values["AzureWebJobsStorage__accountName"]) == ["storage", "name"]
    assert values["AzureWebJobsStorage__credential"] == "managedidentity"
    assert path(values["AzureWebJobsStorage__clientId"]) == ["identity", "properties", "clientId"]


def test_tables_are_reached_through_the_endpoint_and_the_user_assigned_identity() -> None:
    values, api = app_settings(), bicep("app/api")
    assert path(values["AIPROXY_STORAGE_TABLE_ENDPOINT"]) == [
        "storage",
        "properties",
        "primaryEndpoints",
        "table",
    ]
    assert path(values["AZURE_CLIENT_ID"]) == ["identity", "properties", "clientId"]
    identity = api["resources"]["identity"]
    assert identity["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities"
    assert api["resources"]["storage"]["type"] == STORAGE


def test_host_logs_no_line_per_call_and_samples_requests_but_not_exceptions() -> None:
    logging = json.loads((ROOT / "host.json").read_text())["logging"]
    levels = logging["logLevel"]
    # "Executing"/"Executed" per invocation, and the worker's per-call lines, are Information.
    assert levels["Function"] == "Warning"
    assert levels["default"] == "Warning"
    # Requests stay (sampled below); aggregates and startup are per instance, not per call.
    assert levels["Host.Results"] == "Information"
    assert levels["Host.Aggregator"] == "Information"
    assert levels["Host.Startup"] == "Information"
    sampling = logging["applicationInsights"]["samplingSettings"]
    assert sampling["isEnabled"] is True
    assert sampling["maxTelemetryItemsPerSecond"] <= 5
    excluded = set(sampling["excludedTypes"].split(";"))
    assert "Exception" in excluded and "Request" not in excluded


def test_storage_calls_make_no_telemetry_of_their_own() -> None:
    # Three spans per storage call, and the sync loops call storage every second per instance.
    disabled = app_settings()["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"].split(",")
    assert "azure_sdk" in disabled


def test_telemetry_goes_to_application_insights_with_entra_auth() -> None:
    values = app_settings()
    connection = path(values["APPLICATIONINSIGHTS_CONNECTION_STRING"])
    assert connection == ["appInsights", "properties", "ConnectionString"]
    assert values["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == (
        "ClientId=${identity.properties.clientId};Authorization=AAD"
    )
    monitoring = bicep("app/monitoring")
    assert only(monitoring, APP_INSIGHTS)["properties"]["DisableLocalAuth"] is True
    assert resources(monitoring, "Microsoft.OperationalInsights/workspaces")


# --- Key Vault and the encryption key -------------------------------------------------------


def test_key_vault_uses_rbac_and_the_app_gets_its_uri() -> None:
    vault = only(bicep("app/keyvault"), VAULT)
    assert vault["properties"]["enableRbacAuthorization"] is True
    assert path(app_settings()["AIPROXY_KEY_VAULT_URL"]) == ["vault", "properties", "vaultUri"]


def test_encryption_key_is_a_secure_parameter_stored_in_key_vault_and_referenced() -> None:
    main, keyvault = bicep("main"), bicep("app/keyvault")
    param = decorators(main["parameters"]["encryptionKey"])
    assert "secure" in param and param["min_length"] == param["max_length"] == 44
    assert "secure" in decorators(keyvault["parameters"]["encryptionKey"])
    secrets = resources(keyvault, "Microsoft.KeyVault/vaults/secrets")
    stored = [unwrap(entry)[0] for entry in secrets.values()]
    assert {"name": "encryptionKeySecretName", "value": "encryptionKey"} in [
        {"name": body["name"], "value": body["properties"]["value"]} for body in stored
    ]
    assert app_settings()["AIPROXY_ENCRYPTION_KEY"] == (
        "@Microsoft.KeyVault(SecretUri=${encryptionKeySecret.properties.secretUri})"
    )


def test_operator_key_is_a_secure_parameter_stored_in_key_vault_and_referenced() -> None:
    main, keyvault, api = bicep("main"), bicep("app/keyvault"), bicep("app/api")
    param = decorators(main["parameters"]["operatorKey"])
    assert "secure" in param and param["min_length"] == load_hook().OPERATOR_KEY_MIN_LENGTH
    assert main["parameters"]["operatorKey"]["default"] is None
    assert azd_option("operatorKey") == ("AIPROXY_OPERATOR_KEY", None)
    assert "secure" in decorators(keyvault["parameters"]["operatorKey"])
    stored = [unwrap(entry)[0] for entry in resources(keyvault, SECRET).values()]
    assert {"name": "operatorKeySecretName", "value": "operatorKey"} in [
        {"name": body["name"], "value": body["properties"]["value"]} for body in stored
    ]
    # Both modules name the same secret, the one the hook's messages point at.
    assert main["variables"]["operatorKeySecretName"]["value"] == "aiproxy-operator-key"
    assert load_hook().OPERATOR_SECRET_NAME == "aiproxy-operator-key"
    for module in ("keyVault", "api"):
        params = unwrap(main["modules"][module])[0]["params"]
        assert params["operatorKeySecretName"] == "operatorKeySecretName"
    assert unwrap(main["modules"]["keyVault"])[0]["params"]["operatorKey"] == "operatorKey"
    assert "operatorKey" not in unwrap(main["modules"]["api"])[0]["params"]
    # The app gets a reference, never the value; pinned to the version this provision wrote.
    secret = api["resources"]["operatorKeySecret"]
    assert secret["type"] == SECRET and secret["existing"] is True
    assert unwrap(secret)[0]["name"] == "operatorKeySecretName"
    assert app_settings()["AIPROXY_OPERATOR_KEY"] == (
        "@Microsoft.KeyVault(SecretUri=${operatorKeySecret.properties.secretUriWithVersion})"
    )


def test_no_secure_parameter_reaches_an_output() -> None:
    # Outputs are kept in the deployment history and in the azd environment, readable by anyone
    # who may read the deployment.
    for file in BICEP_FILES:
        doc = bicep(str(file.relative_to(INFRA).with_suffix("")))
        secure = {
            name for name, param in doc["parameters"].items() if "secure" in decorators(param)
        }
        for name, output in doc.get("outputs", {}).items():
            used = json.dumps(output["value"])
            assert not any(f'"{param}"' in used for param in secure), (file.name, name)
        if file.name == "main.bicep":
            assert {"encryptionKey", "operatorKey", "authClientSecret"} <= secure


def test_azure_refuses_loopback_upstreams() -> None:
    # Only the local run talks to the simulator on 127.0.0.1; on Azure an organiser's endpoint
    # on loopback would reach the app's own host.
    values = app_settings()
    assert values["AIPROXY_ALLOW_LOOPBACK_UPSTREAMS"] == "false"
    # The operator's extra hosts come from the azd option, empty unless set.
    assert values["AIPROXY_UPSTREAM_HOSTS"] == "upstreamHosts"
    assert main_parameters()["upstreamHosts"]["value"] == "${AIPROXY_UPSTREAM_HOSTS}"


def test_app_identity_resolves_key_vault_references() -> None:
    # A user-assigned identity resolves @Microsoft.KeyVault(...) only when named as such, and
    # needs at least Key Vault Secrets User (Officer includes it) on the vault.
    site = only(bicep("app/api"), "Microsoft.Web/sites")
    assert path(site["properties"]["keyVaultReferenceIdentity"]) == ["identity", "id"]
    readers = {"Key Vault Secrets User", "Key Vault Secrets Officer"}
    assert any(
        a["role"] in readers
        and a["scope"] == VAULT
        and a["principal"] == "identityPrincipalId"
        and a["condition"] is None
        for a in role_assignments()
    )


# --- optional sign-in -----------------------------------------------------------------------


def test_sign_in_settings_are_always_deployed_and_follow_the_flag() -> None:
    api = bicep("app/api")
    body, condition = site_config("authsettingsV2")
    # Deployed only when on, switching sign-in off would leave the old settings running.
    assert condition is None
    assert body["properties"]["platform"]["enabled"] == "authEnabled"
    assert api["parameters"]["authEnabled"]["default"] is False
    providers = conditional(body["properties"]["identityProviders"])
    assert providers["condition"] == "authEnabled"
    assert providers["true_value"]["azureActiveDirectory"]["enabled"] is True
    assert providers["false_value"] == {}


def test_sign_in_accepts_management_tokens_for_the_api_audience() -> None:
    # Unlisted, App Service authentication accepts the client id alone and answers 401 to an
    # organiser's or operator's token for api://<client id> before the app sees it.
    api = bicep("app/api")
    providers = conditional(site_config("authsettingsV2")[0]["properties"]["identityProviders"])
    validation = providers["true_value"]["azureActiveDirectory"]["validation"]
    assert validation["allowedAudiences"] == "managementAudiences"
    assert api["variables"]["managementAudiences"]["value"] == [
        "authClientId",
        "api://${authClientId}",
    ]
    # The app checks the same audiences once the token is through.
    audience = conditional(app_settings()["AIPROXY_ENTRA_ORGANIZER_AUDIENCE"])["true_value"]
    assert call(audience, "join") == {"input_array": "managementAudiences", "delimiter": ","}


def test_no_template_hard_codes_the_public_cloud_login_endpoint() -> None:
    for file in BICEP_FILES:
        assert "login.microsoftonline.com" not in file.read_text(), file.name
    authority = app_settings()["AIPROXY_ENTRA_AUTHORITY"]
    operator = authority["operator"]
    assert operator["type"] == "property_accessor"
    assert operator["operands"]["operand_1"] == {"function": {"type": "environment"}}
    assert path(operator["operands"]["operand_2"]) == ["authentication", "loginEndpoint"]


def test_operator_groups_and_roles_come_from_the_azd_environment() -> None:
    main, api = bicep("main"), bicep("app/api")
    passed = unwrap(main["modules"]["api"])[0]["params"]
    for parameter, option in (
        ("operatorGroups", "AIPROXY_ENTRA_OPERATOR_GROUPS"),
        ("operatorRoles", "AIPROXY_ENTRA_OPERATOR_ROLES"),
    ):
        assert main["parameters"][parameter]["default"] == ""
        assert api["parameters"][parameter]["default"] == ""
        assert azd_option(parameter) == (option, None)
        assert passed[parameter] == parameter
        assert conditional(app_settings()[option]) == {
            "condition": "managementTokens",
            "true_value": parameter,
            "false_value": "",
        }


def test_operator_tokens_alone_switch_token_validation_on() -> None:
    # Tenant and audience are what validate any management token: naming only operator groups
    # or roles must set them too.
    variables = bicep("app/api")["variables"]
    assert "operatorNamed" in json.dumps(variables["managementTokens"]["value"])
    assert "operatorGroups" in json.dumps(variables["operatorNamed"]["value"])
    assert "operatorRoles" in json.dumps(variables["operatorNamed"]["value"])
    for name in ("AIPROXY_ENTRA_ORGANIZER_TENANTS", "AIPROXY_ENTRA_ORGANIZER_AUDIENCE"):
        assert conditional(app_settings()[name])["condition"] == "managementTokens"


def test_local_settings_example_names_the_operator_settings_empty() -> None:
    example = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    for name in (
        "AIPROXY_OPERATOR_KEY",
        "AIPROXY_ENTRA_OPERATOR_GROUPS",
        "AIPROXY_ENTRA_OPERATOR_ROLES",
    ):
        assert example[name] == "", name


def test_sign_in_lets_anonymous_callers_through() -> None:
    validation = site_config("authsettingsV2")[0]["properties"]["globalValidation"]
    assert validation["requireAuthentication"] is False
    assert validation["unauthenticatedClientAction"] == "AllowAnonymous"


def excluded_by_sign_in(path: str) -> bool:
    """Whether App Service authentication skips `path`: exact, or a prefix ending in `*`."""
    patterns = site_config("authsettingsV2")[0]["properties"]["globalValidation"]["excludedPaths"]
    return any(
        path.startswith(pattern[:-1]) if pattern.endswith("*") else path == pattern
        for pattern in patterns
    )


def function_app_routes() -> dict[str, bool]:
    """Every HTTP route the app registers, and whether it takes an event key."""
    import function_app
    from shared.management.routes import ROUTES
    from shared.management.routing import ATTENDEE

    keyed = {route.name for route in ROUTES if route.access == ATTENDEE}
    routes: dict[str, bool] = {}
    for function in function_app.app.get_functions():
        trigger = function.get_trigger()
        if trigger.get_binding_name() == "httpTrigger":
            routes[trigger.route] = function.get_function_name() in keyed
    return routes


def request_path(route: str) -> str:
    """A path the host would match to `route`, under the /api prefix."""
    return "/api/" + re.sub(r"\{\*?(\w+)[^}]*\}", lambda m: f"some-{m[1]}", route)


def test_sign_in_skips_every_route_that_takes_an_event_key() -> None:
    # OpenAI clients send the event key as a bearer token, which sign-in would try to validate
    # as an Entra token and refuse; the Search SDKs' OData route must pass as well.
    routes = function_app_routes()
    keyed = {route for route, takes_key in routes.items() if takes_key}
    assert "indexes('{index}')/docs/search.post.search" in keyed
    assert "indexes/{index}/docs/search" in keyed
    assert {
        "eventinfo",
        "v1/eventinfo",
        "v1/openai/deployments/{deployment}/chat/completions",
    } <= keyed
    for route in keyed:
        assert excluded_by_sign_in(request_path(route)), route


def test_sign_in_still_covers_routes_that_read_the_principal() -> None:
    for route in ("events/{event_id}/register", "console", "manage/events"):
        assert not excluded_by_sign_in(request_path(route)), route


def test_app_trusts_the_principal_header_only_when_sign_in_is_on() -> None:
    trust = conditional(app_settings()["AIPROXY_TRUST_EASYAUTH"])
    assert trust == {"condition": "authEnabled", "true_value": "true", "false_value": "false"}
    main = bicep("main")
    assert main["parameters"]["authEnabled"]["default"] is False
    assert unwrap(main["modules"]["api"])[0]["params"]["authEnabled"] == "authEnabled"


# --- role assignments -----------------------------------------------------------------------


def test_every_role_assignment_uses_a_known_built_in_role() -> None:
    assert {assignment["role"] for assignment in role_assignments()} <= set(ROLES.values())


def test_app_identity_holds_the_roles_the_app_needs() -> None:
    held = {
        (a["role"], a["scope"])
        for a in role_assignments()
        if a["principal"] == "identityPrincipalId" and a["condition"] is None
    }
    assert held == {
        ("Storage Table Data Contributor", STORAGE),
        ("Storage Queue Data Contributor", STORAGE),
        ("Storage Blob Data Owner", STORAGE),
        ("Key Vault Secrets Officer", VAULT),
        ("Monitoring Metrics Publisher", APP_INSIGHTS),
        ("Cognitive Services OpenAI User", OPENAI),
    }
    for a in role_assignments():
        if a["principal"] == "identityPrincipalId":
            assert a["principalType"] == "ServicePrincipal"


def test_deploying_user_gets_data_access_when_known() -> None:
    held = {
        (a["role"], a["scope"]) for a in role_assignments() if a["principal"] == "userPrincipalId"
    }
    assert {
        ("Storage Table Data Contributor", STORAGE),
        ("Key Vault Secrets Officer", VAULT),
    } <= held
    for a in role_assignments():
        if a["principal"] == "userPrincipalId":
            assert call(conditional_operand(a["condition"]), "empty") == {
                "item_to_test": "userPrincipalId"
            }


def test_role_principals_are_wired_from_the_identity_and_the_azd_user() -> None:
    main = bicep("main")
    for module in ("rbac", "openAi"):
        params = unwrap(main["modules"][module])[0]["params"]
        assert path(params["identityPrincipalId"]) == ["identity", "outputs", "principalId"]
        assert params["userPrincipalId"] == "principalId"


def test_optional_openai_account_is_keyless_with_deployments_from_a_parameter() -> None:
    main, openai = bicep("main"), bicep("app/openai")
    assert unwrap(main["modules"]["openAi"])[1] == "createOpenAi"
    assert main["parameters"]["createOpenAi"]["default"] is False
    account = only(openai, OPENAI)
    assert account["kind"] == "OpenAI"
    assert account["properties"]["disableLocalAuth"] is True
    (deployments,) = resources(openai, "Microsoft.CognitiveServices/accounts/deployments").values()
    assert deployments["config"]["loop_type"]["detail"]["array_name"] == "deployments"
    assert decorators(deployments)["batchSize"] == 1
    for deployment in main_parameters()["openAiDeployments"]["value"]:
        assert {"name", "model", "version", "sku", "capacity"} <= set(deployment)


# --- the app package -------------------------------------------------------------------------


def funcignore() -> list[str]:
    lines = (ROOT / ".funcignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def left_out(relative: str) -> bool:
    """Whether .funcignore leaves `relative` out: a pattern matching any of its path parts."""
    parts = relative.split("/")
    return any(
        fnmatch.fnmatchcase(part, pattern.rstrip("/")) for pattern in funcignore() for part in parts
    )


def runtime_packages() -> set[str]:
    """Top-level local packages that function_app.py and what it imports import, transitively."""
    found: set[str] = set()
    todo = [ROOT / "function_app.py"]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top not in found and (ROOT / top / "__init__.py").is_file():
                    found.add(top)
                    todo.extend((ROOT / top).rglob("*.py"))
    return found


def test_funcignore_uses_only_patterns_the_checks_here_understand() -> None:
    # Plain names and globs match a path part at any depth, in azd's gitignore parser as here.
    for pattern in funcignore():
        assert not pattern.startswith("!") and "/" not in pattern.rstrip("/"), pattern
        assert "**" not in pattern, pattern


def test_app_package_keeps_what_the_app_needs_at_run_time() -> None:
    assert runtime_packages() == {"shared"}
    needed = ["function_app.py", "host.json", "requirements.txt", "pages/console.html"]
    needed += [f"{package}/__init__.py" for package in runtime_packages()]
    for relative in needed:
        assert (ROOT / relative).is_file(), relative
        assert not left_out(relative), relative


def test_app_package_leaves_out_development_files() -> None:
    for relative in (
        "cli/main.py",
        "local/host.py",
        "bench/run.py",
        "tests/test_infra.py",
        "infra/main.bicep",
        "README.md",
        "pyproject.toml",
        "requirements-dev.txt",
        "aiproxy.egg-info/PKG-INFO",
        ".venv/pyvenv.cfg",
        "py313_env/pyvenv.cfg",
        "shared/__pycache__/keys.cpython-313.pyc",
        ".pytest_cache/README.md",
        ".ruff_cache/CACHEDIR.TAG",
        "local.settings.json",
        "node_modules/marked/package.json",
    ):
        assert left_out(relative), relative


def test_nothing_shipped_imports_a_development_package() -> None:
    assert not runtime_packages() & {"cli", "local", "bench", "tests"}


# --- the preprovision hook ------------------------------------------------------------------


def test_hook_accepts_a_key_made_the_documented_way_or_by_fernet() -> None:
    hook = load_hook()
    documented = base64.urlsafe_b64encode(os.urandom(32)).decode()
    for key in (documented, Fernet.generate_key().decode(), hook.new_encryption_key()):
        assert hook.problems(with_key(AIPROXY_ENCRYPTION_KEY=key)) == []


def test_hook_tells_how_to_create_a_key_when_run_outside_azd() -> None:
    (problem,) = load_hook().problems(with_key(AIPROXY_ENCRYPTION_KEY=""))
    assert "azd env set AIPROXY_ENCRYPTION_KEY" in problem and "os.urandom(32)" in problem


def test_hook_never_invents_a_key_for_a_provisioned_environment() -> None:
    env = with_key(AIPROXY_ENCRYPTION_KEY="", AZURE_KEY_VAULT_NAME="kv-abc")
    (problem,) = load_hook().problems(env)
    assert "az keyvault secret show --vault-name kv-abc --name aiproxy-encryption-key" in problem


@pytest.mark.parametrize(
    "key",
    ["not-a-key", "A" * 44, base64.urlsafe_b64encode(b"31 bytes are one byte too few.").decode()],
)
def test_hook_refuses_a_malformed_key(key: str) -> None:
    (problem,) = load_hook().problems(with_key(AIPROXY_ENCRYPTION_KEY=key))
    assert "AIPROXY_ENCRYPTION_KEY is not a Fernet key" in problem


def test_hook_refuses_sign_in_without_an_app_registration() -> None:
    (problem,) = load_hook().problems(with_key(AIPROXY_AUTH_ENABLED="true"))
    assert "AIPROXY_AUTH_CLIENT_ID" in problem


# What Go's strconv.ParseBool accepts, which azd uses for bool parameters.
GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True}
GO_BOOLS |= {"0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def with_key(**options: str) -> dict[str, str]:
    """An environment with both secrets set, plus `options`."""
    return {
        "AIPROXY_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "AIPROXY_OPERATOR_KEY": load_hook().new_operator_key(),
        **options,
    }


@pytest.mark.parametrize("name", ["AIPROXY_AUTH_ENABLED", "AIPROXY_CREATE_OPENAI"])
@pytest.mark.parametrize("spelling", sorted(GO_BOOLS))
def test_hook_accepts_every_boolean_spelling_azd_accepts(name: str, spelling: str) -> None:
    hook = load_hook()
    assert hook.parse_bool(spelling) is GO_BOOLS[spelling]
    env = with_key(**{name: spelling, "AIPROXY_AUTH_CLIENT_ID": "app-id"})
    assert hook.problems(env) == []


@pytest.mark.parametrize("name", ["AIPROXY_AUTH_ENABLED", "AIPROXY_CREATE_OPENAI"])
@pytest.mark.parametrize("spelling", ["yes", "no", "on", "off", "tRuE", "y", " true", "true\n"])
def test_hook_refuses_booleans_azd_would_replace_by_the_default(name: str, spelling: str) -> None:
    (problem,) = load_hook().problems(with_key(**{name: spelling}))
    assert name in problem and repr(spelling) in problem
    assert f"azd env set {name} true" in problem and f"azd env set {name} false" in problem


def test_hook_treats_sign_in_spelled_the_go_way_as_on() -> None:
    (problem,) = load_hook().problems(with_key(AIPROXY_AUTH_ENABLED="T"))
    assert "AIPROXY_AUTH_CLIENT_ID" in problem


def test_hook_lets_unset_and_empty_options_take_their_defaults() -> None:
    names = ["AIPROXY_AUTH_ENABLED", "AIPROXY_CREATE_OPENAI", *load_hook().INT_OPTIONS]
    assert load_hook().problems(with_key(**dict.fromkeys(names, ""))) == []


@pytest.mark.parametrize("value", ["16", "+16", "016", "1000"])
def test_hook_accepts_whole_numbers_as_azd_reads_them(value: str) -> None:
    assert load_hook().problems(with_key(AIPROXY_HTTP_CONCURRENCY=value)) == []


@pytest.mark.parametrize("value", ["16.0", "1_6", " 16", "16\n", "sixteen", "\u0661\u0666", "0x10"])
def test_hook_refuses_numbers_azd_would_replace_by_the_default(value: str) -> None:
    (problem,) = load_hook().problems(with_key(AIPROXY_HTTP_CONCURRENCY=value))
    assert repr(value) in problem and "azd env set AIPROXY_HTTP_CONCURRENCY 64" in problem


@pytest.mark.parametrize(
    ("name", "value"),
    [("AIPROXY_MAXIMUM_INSTANCE_COUNT", "39"), ("AIPROXY_HTTP_CONCURRENCY", "0")],
)
def test_hook_refuses_numbers_outside_the_template_range(name: str, value: str) -> None:
    (problem,) = load_hook().problems(with_key(**{name: value}))
    assert name in problem and "must be from" in problem


@pytest.mark.parametrize(("always_ready", "maximum"), [("101", ""), ("41", "40"), ("1000", "999")])
def test_hook_refuses_more_always_ready_instances_than_the_maximum(
    always_ready: str, maximum: str
) -> None:
    env = with_key(AIPROXY_ALWAYS_READY=always_ready, AIPROXY_MAXIMUM_INSTANCE_COUNT=maximum)
    (problem,) = load_hook().problems(env)
    assert "AIPROXY_ALWAYS_READY" in problem and "AIPROXY_MAXIMUM_INSTANCE_COUNT" in problem
    assert f"azd env set AIPROXY_ALWAYS_READY {maximum or 100}" in problem


@pytest.mark.parametrize(("always_ready", "maximum"), [("100", ""), ("40", "40"), ("0", "")])
def test_hook_accepts_always_ready_instances_up_to_the_maximum(
    always_ready: str, maximum: str
) -> None:
    env = with_key(AIPROXY_ALWAYS_READY=always_ready, AIPROXY_MAXIMUM_INSTANCE_COUNT=maximum)
    assert load_hook().problems(env) == []


@pytest.mark.parametrize(
    "key", ["short", "x" * 31, "a" * 40 + " ", "a" * 40 + "+/", "a" * 40 + "\n"]
)
def test_hook_refuses_a_weak_or_header_unsafe_operator_key(key: str) -> None:
    (problem,) = load_hook().problems(with_key(AIPROXY_OPERATOR_KEY=key))
    assert "AIPROXY_OPERATOR_KEY must be at least 32 characters" in problem
    assert key not in problem


def test_hook_makes_strong_distinct_operator_keys() -> None:
    hook = load_hook()
    keys = {hook.new_operator_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert hook.is_operator_key(key) and len(key) == 43
        assert len(base64.urlsafe_b64decode(key + "=")) == 32


# --- the hook run as azd runs it: it makes the secrets a new environment lacks -----------------

FAKE_AZD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_AZD_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("FAKE_AZD_EXIT", "0")))
"""


def run_hook(
    tmp_path: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run infra/hooks/preprovision.py in its own process, as azd does, with an azd on PATH
    that records what it is asked; the hook's output and azd's calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    azd = bin_dir / "azd"
    azd.write_text(FAKE_AZD.format(python=sys.executable))
    azd.chmod(azd.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "azd-calls.jsonl"
    process_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_AZD_LOG": str(log),
        "AZURE_ENV_NAME": "event-test",
        **env,
    }
    result = subprocess.run(
        [sys.executable, str(INFRA / "hooks/preprovision.py")],
        env=process_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def stored(calls: list[list[str]]) -> dict[str, str]:
    """What the hook stored with azd env set, by name, checking the form of every call."""
    values = {}
    for call_args in calls:
        # The environment azd runs the hook for, and "--" so a value may start with "-".
        assert call_args[:5] == ["env", "set", "--environment", "event-test", "--"], call_args
        name, value = call_args[5:]
        values[name] = value
    return values


def test_hook_makes_both_secrets_for_a_new_environment_and_prints_neither(tmp_path: Path) -> None:
    result, calls = run_hook(tmp_path)
    assert result.returncode == 0, result.stderr
    values = stored(calls)
    assert set(values) == {"AIPROXY_ENCRYPTION_KEY", "AIPROXY_OPERATOR_KEY"}
    Fernet(values["AIPROXY_ENCRYPTION_KEY"].encode())  # a key Fernet takes
    assert load_hook().is_fernet_key(values["AIPROXY_ENCRYPTION_KEY"])
    assert load_hook().is_operator_key(values["AIPROXY_OPERATOR_KEY"])
    for value in values.values():
        assert value not in result.stdout and value not in result.stderr
    assert "azd env get-value AIPROXY_OPERATOR_KEY" in result.stderr


def test_hook_leaves_secrets_already_set_alone(tmp_path: Path) -> None:
    env = with_key(AZURE_KEY_VAULT_NAME="kv-abc")
    result, calls = run_hook(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert calls == []


def test_hook_makes_an_operator_key_for_an_environment_provisioned_without_one(
    tmp_path: Path,
) -> None:
    # Environments provisioned before the operator key existed get one; their encryption key
    # stays the one in use.
    env = with_key(AZURE_KEY_VAULT_NAME="kv-abc")
    del env["AIPROXY_OPERATOR_KEY"]
    result, calls = run_hook(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert set(stored(calls)) == {"AIPROXY_OPERATOR_KEY"}
    assert "--vault-name kv-abc --name aiproxy-operator-key" in result.stderr


def test_hook_never_makes_an_encryption_key_for_a_provisioned_environment(
    tmp_path: Path,
) -> None:
    env = with_key(AZURE_KEY_VAULT_NAME="kv-abc")
    del env["AIPROXY_ENCRYPTION_KEY"]
    result, calls = run_hook(tmp_path, **env)
    assert result.returncode == 1
    assert "AIPROXY_ENCRYPTION_KEY" not in stored(calls)
    assert "az keyvault secret show --vault-name kv-abc --name aiproxy-encryption-key" in (
        result.stderr
    )


def test_hook_stops_provisioning_when_azd_cannot_store_a_secret(tmp_path: Path) -> None:
    result, calls = run_hook(tmp_path, FAKE_AZD_EXIT="1")
    assert result.returncode == 1
    assert "azd env set AIPROXY_ENCRYPTION_KEY failed" in result.stderr
    (call_args,) = calls
    assert call_args[-1] not in result.stderr and call_args[-1] not in result.stdout


def test_hook_knows_the_same_options_ranges_and_defaults_as_the_templates() -> None:
    hook, main = load_hook(), bicep("main")
    ints, bools = {}, set()
    for parameter, declared in main["parameters"].items():
        if parameter not in main_parameters() or declared["type"] not in ("int", "bool"):
            continue
        name, default = azd_option(parameter)
        if declared["type"] == "bool":
            bools.add(name)
            assert hook.parse_bool(default) is declared["default"]
        else:
            bounds = decorators(declared)
            ints[name] = (bounds["min_value"], bounds["max_value"], declared["default"])
            assert int(default) == declared["default"]
    assert set(hook.BOOL_OPTIONS) == bools
    assert ints == hook.INT_OPTIONS


# --- docs/deploy.md tells an Azure user everything ----------------------------------------


def test_readme_has_a_deploy_section_covering_the_whole_path() -> None:
    readme = (ROOT / "docs" / "deploy.md").read_text()
    assert re.search(r"^## Deploy to Azure$", readme, flags=re.MULTILINE)
    deploy = re.split(r"^## ", readme.split("\n## Deploy to Azure\n", 1)[1], flags=re.MULTILINE)[0]
    for needed in (
        "azd up",
        "azd deploy",
        "AIPROXY_ENCRYPTION_KEY",
        "az functionapp keys list",
        "AIPROXY_ENDPOINT=$URL",
        "aiproxy events create",
        "aiproxy catalog attach",
        "AIPROXY_AUTH_ENABLED",
        "AIPROXY_CREATE_OPENAI",
        "AIPROXY_HTTP_CONCURRENCY",
        "AIPROXY_ALWAYS_READY",
        "Cost",
        "rolling updates",
        "per 100k calls",
        "### HTTP concurrency per instance",
        "indexes('{index}')/docs/search.post.search",
    ):
        assert needed in deploy, needed
    # always-ready set with az would be undone by the next azd provision
    assert "always-ready set" not in deploy


def test_readme_options_table_matches_the_parameters_file() -> None:
    readme = (ROOT / "docs" / "deploy.md").read_text()
    options = readme.split("\n### Options\n", 1)[1].split("\n### ", 1)[0]
    rows = {
        match[1]: match[2]
        for match in re.finditer(r"^\| `(AIPROXY_\w+)`[^|]*\| ([^|]+) \|", options, re.MULTILINE)
    }
    for parameter, given in main_parameters().items():
        if not str(given["value"]).startswith("${AIPROXY_"):
            continue
        name, default = azd_option(parameter)
        # Secrets the preprovision hook makes, not options to choose.
        if name in ("AIPROXY_ENCRYPTION_KEY", "AIPROXY_OPERATOR_KEY"):
            continue
        if name == "AIPROXY_AUTH_CLIENT_SECRET":
            name = "AIPROXY_AUTH_CLIENT_ID"  # one row for the app registration
        assert name in rows, name
        if default is not None:
            assert rows[name] == f"`{default}`", (name, rows[name])
