// The Function app on Flex Consumption (Linux, Python 3.13) and every app setting it reads.
// The runtime, scale and deployment package live in functionAppConfig; Flex rejects the older
// settings for them (FUNCTIONS_WORKER_RUNTIME, WEBSITE_RUN_FROM_PACKAGE, content shares, ...).
param name string
param planName string
param location string = resourceGroup().location
param tags object = {}
param identityName string
param storageAccountName string
param deploymentContainerName string
param keyVaultName string
param encryptionKeySecretName string
param operatorKeySecretName string
param appInsightsName string

@minValue(40)
@maxValue(1000)
@description('Most instances the app scales out to. 40 is the lowest Flex Consumption documents outside preview regions; 1000 the highest.')
param maximumInstanceCount int = 100

// Flex Consumption gives Python apps 1 concurrent HTTP call per instance unless told otherwise,
// which would hold a whole instance for every open stream.
@minValue(1)
@maxValue(1000)
@description('Concurrent HTTP calls one instance takes before Flex Consumption adds another (the http scale group).')
param httpPerInstanceConcurrency int = 64

@minValue(0)
@maxValue(1000)
@description('Instances of the http scale group kept running (and billed) around the clock; 0: none.')
param alwaysReadyInstanceCount int = 0

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

param authEnabled bool = false
param authClientId string = ''
param authTenantId string = tenant().tenantId

@description('Key Vault secret holding the sign-in client secret; empty: none.')
param authClientSecretName string = ''

@description('Entra groups (object ids) and app roles whose principals manage their own events by token, commas.')
param organizerGroups string = ''
param organizerRoles string = ''

@description('Upstream hosts beyond Azure AI services organisers may name (AIPROXY_UPSTREAM_HOSTS).')
param upstreamHosts string = ''

@description('Hosts MCP servers may be on; empty: any public https host on 443 (AIPROXY_MCP_HOSTS).')
param mcpHosts string = ''

@description('Entra groups (object ids) and app roles whose principals are operators (every event) by token, commas.')
param operatorGroups string = ''
param operatorRoles string = ''

// Organisers and operators by token: tokens of this tenant for the sign-in app registration,
// once a group or an app role is named for either.
var organizerNamed = !empty(organizerGroups) || !empty(organizerRoles)
var operatorNamed = !empty(operatorGroups) || !empty(operatorRoles)
var managementTokens = !empty(authClientId) && (organizerNamed || operatorNamed)
// The audiences such a token may carry: v2.0 access tokens name the client id, v1.0 ones the
// application id URI. App Service authentication checks the same list before the app sees a
// token, and by default it accepts the client id alone.
var managementAudiences = [
  authClientId
  'api://${authClientId}'
]

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  name: identityName
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource encryptionKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: vault
  name: encryptionKeySecretName
}

resource operatorKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: vault
  name: operatorKeySecretName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

// 2025-03-01: the newest version the Bicep types know, so every property here is type-checked
// (functionAppConfig, Flex's, is typed from 2023-12-01 on). Only siteUpdateStrategy is missing
// from the types of every version, hence the one suppression on it; the service takes it with
// this version (Microsoft documents it for ARM and Bicep from 2024-11-01 on).
resource app 'Microsoft.Web/sites@2025-03-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // @Microsoft.KeyVault(...) app settings resolve with the user-assigned identity.
    keyVaultReferenceIdentity: identity.id
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
        // Sent on every provision, so an always-ready count set by hand does not survive it.
        alwaysReady: (alwaysReadyInstanceCount > 0) ? [
          {
            name: 'http'
            instanceCount: alwaysReadyInstanceCount
          }
        ] : []
      }
      // The default (Recreate) stops running executions, streams included, on every deploy and
      // settings change; rolling updates drain instances in batches and let calls finish.
      #disable-next-line BCP037
      siteUpdateStrategy: {
        type: 'RollingUpdate'
      }
      runtime: {
        name: 'python'
        version: '3.13'
      }
    }
  }
}

// Every setting shared/platform/settings.py reads, plus what the host needs; defaults match the module.
// Left out on purpose: AIPROXY_FUNCTION_KEY (the host issues keys) and
// AIPROXY_STORAGE_CONNECTION_STRING (the identity replaces it). tests/test_infra.py checks this.
var settings = {
  // The host's own storage (keys, timer locks) through the identity: no connection string.
  AzureWebJobsStorage__accountName: storage.name
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.properties.clientId
  // Telemetry: the connection string names the resource; ingestion authenticates as the identity.
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.properties.clientId};Authorization=AAD'
  // The app's own spans (one per upstream attempt) go to Application Insights, the Azure SDK's do
  // not: every storage call makes three spans, and the sync loops call storage every second on
  // every instance, busy or idle.
  OTEL_PYTHON_DISABLED_INSTRUMENTATIONS: 'azure_sdk'
  // The HTTP streams extension needs init indexing on Python 3.11/3.12; 3.13's worker always
  // indexes at init. Kept so the app still streams if the runtime version is lowered.
  PYTHON_ENABLE_INIT_INDEXING: '1'
  // Table Storage through the identity (DefaultAzureCredential with AZURE_CLIENT_ID).
  AIPROXY_STORAGE_TABLE_ENDPOINT: storage.properties.primaryEndpoints.table
  AZURE_CLIENT_ID: identity.properties.clientId
  AIPROXY_TABLE_PREFIX: 'aiproxy'
  AIPROXY_KEY_VAULT_URL: vault.properties.vaultUri
  AIPROXY_ENCRYPTION_KEY: '@Microsoft.KeyVault(SecretUri=${encryptionKeySecret.properties.secretUri})'
  // The operator's credential, pinned to the version this provision wrote: a rotated key (the
  // preprovision hook makes a new one when AIPROXY_OPERATOR_KEY is emptied) changes this
  // setting, so the app reads it at once instead of within the day a versionless reference takes.
  AIPROXY_OPERATOR_KEY: '@Microsoft.KeyVault(SecretUri=${operatorKeySecret.properties.secretUriWithVersion})'
  AIPROXY_DEFAULT_API_VERSION: '2024-10-21'
  AIPROXY_MAX_BODY_BYTES: '26214400'
  AIPROXY_CACHE_TTL_SECONDS: '5'
  AIPROXY_USAGE_FLUSH_SECONDS: '1'
  // Empty: usage records wait in the instance's temp folder while storage is down.
  AIPROXY_USAGE_SPILL_DIR: ''
  AIPROXY_USAGE_RETENTION_DAYS: '30'
  AIPROXY_SYNC_SECONDS: '1'
  AIPROXY_UPSTREAM_CONNECT_TIMEOUT: '5'
  AIPROXY_UPSTREAM_READ_TIMEOUT: '60'
  AIPROXY_STREAM_IDLE_TIMEOUT: '60'
  AIPROXY_UPSTREAM_TOTAL_TIMEOUT: '220'
  AIPROXY_CALL_EXPIRY_SECONDS: '300'
  AIPROXY_REALTIME_ATTACH_SECONDS: '20'
  // Upstream endpoints: Azure AI services' hosts and these (shared/directory/endpoints.py).
  // Loopback upstreams are for the local simulator only, never on Azure.
  AIPROXY_UPSTREAM_HOSTS: upstreamHosts
  AIPROXY_MCP_HOSTS: mcpHosts
  AIPROXY_ALLOW_LOOPBACK_UPSTREAMS: 'false'
  // Only App Service authentication strips a client's own X-MS-CLIENT-PRINCIPAL header, so the
  // app may trust that header exactly when sign-in is switched on.
  AIPROXY_TRUST_EASYAUTH: authEnabled ? 'true' : 'false'
  // Self-registration by shared code: wrong codes per event per minute (all instances), and
  // new attendees per client address per event per hour. Raise the second for a venue whose
  // attendees all register from one public address.
  AIPROXY_WRONG_CODES_PER_EVENT_MINUTE: '30'
  AIPROXY_NEW_ATTENDEES_PER_ADDRESS_HOUR: '200'
  // Entra ID tokens of attendees, organisers and operators (docs/api.md, "Entra ID access tokens"), from this
  // cloud's login endpoint (sovereign clouds have their own).
  AIPROXY_ENTRA_AUTHORITY: environment().authentication.loginEndpoint
  AIPROXY_ENTRA_KEY_REFETCH_SECONDS: '60'
  AIPROXY_ENTRA_ORGANIZER_TENANTS: managementTokens ? authTenantId : ''
  AIPROXY_ENTRA_ORGANIZER_AUDIENCE: managementTokens ? join(managementAudiences, ',') : ''
  AIPROXY_ENTRA_ORGANIZER_GROUPS: managementTokens ? organizerGroups : ''
  AIPROXY_ENTRA_ORGANIZER_ROLES: managementTokens ? organizerRoles : ''
  AIPROXY_ENTRA_OPERATOR_GROUPS: managementTokens ? operatorGroups : ''
  AIPROXY_ENTRA_OPERATOR_ROLES: managementTokens ? operatorRoles : ''
  AIPROXY_ROLLUP_SCHEDULE: '0 */5 * * * *'
  AIPROXY_RETENTION_SCHEDULE: '0 30 3 * * *'
  AIPROXY_REALTIME_QUEUE: 'aiproxy-realtime'
  // Plugins (docs/plugins.md): none by default. Name them here, and add each one's
  // AIPROXY_PLUGIN_<NAME> config beside them: a setting changed in the portal lasts only until
  // the next azd provision.
  AIPROXY_PLUGINS: ''
  AIPROXY_PLUGINS_REQUEST_BUDGET_MS: '250'
  AIPROXY_PLUGINS_USAGE_BUDGET_SECONDS: '10'
}

var authClientSecretReference = '@Microsoft.KeyVault(SecretUri=${vault.properties.vaultUri}secrets/${authClientSecretName})'
var authSettings = (authEnabled && !empty(authClientSecretName)) ? {
  MICROSOFT_PROVIDER_AUTHENTICATION_SECRET: authClientSecretReference
} : {}

resource appSettings 'Microsoft.Web/sites/config@2025-03-01' = {
  parent: app
  name: 'appsettings'
  properties: union(settings, authSettings)
}

// Entra sign-in for the console. Always deployed, with platform.enabled following the flag:
// deploying it only when on would leave sign-in running after it is switched off. Anonymous
// requests still pass (attendees use event keys), and the routes that take an event key are left
// out entirely: OpenAI clients send the key as a bearer token, which sign-in would otherwise try
// to validate as an Entra token and refuse. None of those routes reads the principal header.
// Both search routes are covered: /indexes/{index}/... and /indexes('{index}')/..., the MCP
// servers' /mcp/{name} (MCP clients send the key as a bearer token too), and the same routes
// again under the seed's /api/v1.
resource auth 'Microsoft.Web/sites/config@2025-03-01' = {
  parent: app
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: authEnabled
    }
    globalValidation: {
      requireAuthentication: false
      unauthenticatedClientAction: 'AllowAnonymous'
      excludedPaths: [
        '/api/openai/*'
        '/api/indexes/*'
        '/api/indexes(*'
        '/api/eventinfo'
        '/api/mcp/*'
        '/api/v1/*'
      ]
    }
    httpSettings: {
      requireHttps: true
    }
    login: {
      tokenStore: {
        enabled: false
      }
    }
    identityProviders: authEnabled ? {
      azureActiveDirectory: {
        enabled: true
        registration: union({
          clientId: authClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${authTenantId}/v2.0'
        }, empty(authClientSecretName) ? {} : {
          clientSecretSettingName: 'MICROSOFT_PROVIDER_AUTHENTICATION_SECRET'
        })
        // Organiser and operator tokens for the API (aud api://<client id>) pass sign-in to
        // reach the app, which decides who they are; the default list has the client id only.
        validation: {
          allowedAudiences: managementAudiences
        }
      }
    } : {}
  }
  dependsOn: [
    appSettings
  ]
}

output name string = app.name
output url string = 'https://${app.properties.defaultHostName}/api'
