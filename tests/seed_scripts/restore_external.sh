# "Restore from External Backup" from seed-backup-api.md, verbatim.
# Download backup from S3
aws s3 cp "s3://my-backups/backup_postgresql_20241110_120000.sql.gz" ./backup.sql.gz

# Upload and restore
curl -X POST "http://localhost:8081/backup/restore-upload" \
  -H "Authorization: Bearer $ACCESS_TOKEN" \
  -F "file=@./backup.sql.gz"

echo "Database restored from external backup"
