# "Quick Start" from seed-backup-api.md, verbatim but for the backup name (the seed prints
# a fixed example name; here it comes from step 1's response, as a user would copy it).
curl -X POST "http://localhost:8081/backup/create?compress=true" \
  -H "Authorization: Bearer $ACCESS_TOKEN" > create.json
BACKUP_NAME=$(jq -r .filename create.json)

curl -X GET "http://localhost:8081/backup/download/$BACKUP_NAME" \
  -H "Authorization: Bearer $ACCESS_TOKEN" \
  -O

curl -X POST "http://localhost:8081/backup/restore/$BACKUP_NAME?create_safety_backup=true" \
  -H "Authorization: Bearer $ACCESS_TOKEN"
