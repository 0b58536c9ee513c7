"""TokenService and ServiceAccountService over gRPC: proto ⇄ domain, nothing else."""

from __future__ import annotations

from typing import Any

from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth_svc.api.servicer import timestamp_of
from services.auth_svc.domain import ClientKey, ClientSecret, ServiceAccount
from services.auth_svc.service.service_accounts import (
    TOKEN_TYPE_ACCESS_TOKEN,
    ServiceAccountAdmin,
    TokenEndpoint,
    TokenRequest,
)
from shared.rpc.request_path import principal_of

__all__ = ["ServiceAccountServicer", "TokenServicer", "account_to_proto"]

TOKEN_TYPE = "Bearer"


def secret_to_proto(secret: ClientSecret) -> auth_pb2.ServiceAccountSecret:
    return auth_pb2.ServiceAccountSecret(
        id=str(secret.id), create_time=timestamp_of(secret.create_time)
    )


def key_to_proto(key: ClientKey) -> auth_pb2.ServiceAccountKey:
    return auth_pb2.ServiceAccountKey(
        kid=key.kid, alg=key.alg, create_time=timestamp_of(key.create_time)
    )


def account_to_proto(account: ServiceAccount) -> auth_pb2.ServiceAccount:
    message = auth_pb2.ServiceAccount(
        id=str(account.id),
        display_name=account.display_name,
        scopes=list(account.scopes),
        secrets=[secret_to_proto(s) for s in account.secrets],
        keys=[key_to_proto(k) for k in account.keys],
        create_time=timestamp_of(account.create_time),
    )
    if account.last_used_time is not None:
        message.last_used_time.CopyFrom(timestamp_of(account.last_used_time))
    return message


class TokenServicer(auth_pb2_grpc.TokenServiceServicer):
    def __init__(self, endpoint: TokenEndpoint) -> None:
        self._endpoint = endpoint

    def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: Any
    ) -> auth_pb2.IssueTokenResponse:
        issued = self._endpoint.issue(
            TokenRequest(
                grant_type=request.grant_type,
                client_id=request.client_id,
                client_secret=request.client_secret,
                client_assertion_type=request.client_assertion_type,
                client_assertion=request.client_assertion,
                scope=request.scope,
                subject_token=request.subject_token,
                subject_token_type=request.subject_token_type,
            )
        )
        return auth_pb2.IssueTokenResponse(
            access_token=issued.access_token,
            token_type=TOKEN_TYPE,
            expires_in=issued.expires_in,
            scope=" ".join(issued.scopes),
            issued_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        )


class ServiceAccountServicer(auth_pb2_grpc.ServiceAccountServiceServicer):
    def __init__(self, admin: ServiceAccountAdmin) -> None:
        self._admin = admin

    def CreateServiceAccount(
        self, request: auth_pb2.CreateServiceAccountRequest, context: Any
    ) -> auth_pb2.CreateServiceAccountResponse:
        account, secret = self._admin.create(
            principal=principal_of(context),
            display_name=request.service_account.display_name,
            scopes=list(request.service_account.scopes),
        )
        return auth_pb2.CreateServiceAccountResponse(
            service_account=account_to_proto(account),
            client_secret=secret,
            secret_id=str(account.secrets[0].id),
        )

    def GetServiceAccount(
        self, request: auth_pb2.GetServiceAccountRequest, context: Any
    ) -> auth_pb2.GetServiceAccountResponse:
        account = self._admin.get(principal=principal_of(context), account_id=request.id)
        return auth_pb2.GetServiceAccountResponse(service_account=account_to_proto(account))

    def ListServiceAccounts(
        self, request: auth_pb2.ListServiceAccountsRequest, context: Any
    ) -> auth_pb2.ListServiceAccountsResponse:
        accounts, next_token = self._admin.list(
            principal=principal_of(context),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return auth_pb2.ListServiceAccountsResponse(
            service_accounts=[account_to_proto(a) for a in accounts],
            next_page_token=next_token,
        )

    def DeleteServiceAccount(
        self, request: auth_pb2.DeleteServiceAccountRequest, context: Any
    ) -> auth_pb2.DeleteServiceAccountResponse:
        self._admin.delete(principal=principal_of(context), account_id=request.id)
        return auth_pb2.DeleteServiceAccountResponse()

    def AddServiceAccountSecret(
        self, request: auth_pb2.AddServiceAccountSecretRequest, context: Any
    ) -> auth_pb2.AddServiceAccountSecretResponse:
        secret, value = self._admin.add_secret(
            principal=principal_of(context), account_id=request.service_account_id
        )
        return auth_pb2.AddServiceAccountSecretResponse(
            secret=secret_to_proto(secret), client_secret=value
        )

    def RemoveServiceAccountSecret(
        self, request: auth_pb2.RemoveServiceAccountSecretRequest, context: Any
    ) -> auth_pb2.RemoveServiceAccountSecretResponse:
        self._admin.remove_secret(
            principal=principal_of(context),
            account_id=request.service_account_id,
            secret_id=request.secret_id,
        )
        return auth_pb2.RemoveServiceAccountSecretResponse()

    def AddServiceAccountKey(
        self, request: auth_pb2.AddServiceAccountKeyRequest, context: Any
    ) -> auth_pb2.AddServiceAccountKeyResponse:
        key = self._admin.add_key(
            principal=principal_of(context),
            account_id=request.service_account_id,
            public_key_pem=request.public_key_pem,
        )
        return auth_pb2.AddServiceAccountKeyResponse(key=key_to_proto(key))

    def RemoveServiceAccountKey(
        self, request: auth_pb2.RemoveServiceAccountKeyRequest, context: Any
    ) -> auth_pb2.RemoveServiceAccountKeyResponse:
        self._admin.remove_key(
            principal=principal_of(context),
            account_id=request.service_account_id,
            kid=request.kid,
        )
        return auth_pb2.RemoveServiceAccountKeyResponse()
